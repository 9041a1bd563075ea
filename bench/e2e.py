"""Figures 2 and 6: a JSONL flow through Dagster from launch to finalized row, and its memory.

Each run is a fresh ``bench.e2e_worker`` process (its peak RSS is its own) on a fresh
ledger database and an empty Redis:

* in-process: ``flow_assets.cli.runner.run_flow`` (``execute_in_process`` + one finalizer
  tick), on a default local Dagster instance (SQLite storage in a temp DAGSTER_HOME), as
  ``flowctl run`` does;
* multiprocess: ``dagster.execute_job`` of a reconstructable job, forkserver, one step
  process per core at a time, on a Dagster instance on PostgreSQL (the production setup),
  then one finalizer tick.

``dagster_overhead_share`` is the share of the wall time spent outside our code: wall
minus (page reads from the file + ``process_pages`` + the finalizer tick), over wall. With
the multiprocess executor the page work is spread over ``workers`` processes, so it counts
``process_pages`` time divided by ``workers``: an estimate, not a measurement.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import data
from bench.e2e_worker import RESULT_PREFIX
from bench.environment import BenchServers
from bench.profiling import Share

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER_TIMEOUT_S = 1200


def run_worker(servers: BenchServers, mode: str, records: int, **extra: Any) -> dict[str, Any]:
    """One e2e run in a fresh process; its measurements."""
    servers.flush_redis()
    data_path = data.write_jsonl(servers.workdir / f"records_{records}.jsonl", records)
    home = (
        servers.dagster_home("bench_e2e_dagster")
        if mode == "multiprocess"
        else Path(tempfile.mkdtemp(prefix="dagster-home-", dir=servers.workdir))
    )
    spec = {
        "mode": mode,
        "records": records,
        "data_path": str(data_path),
        "redis_url": servers.redis_url,
        "database_url": servers.new_database("bench_e2e"),
        "dagster_home": str(home),
        "timing_dir": tempfile.mkdtemp(prefix="timings-", dir=servers.workdir),
        "workers": os.cpu_count() or 2,
        **extra,
    }
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = _run_in_own_group(
        [sys.executable, "-m", "bench.e2e_worker", json.dumps(spec)], env, WORKER_TIMEOUT_S
    )
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = json.loads(line.removeprefix(RESULT_PREFIX))
            result["workers"] = spec["workers"]
            return result
    raise RuntimeError(
        f"e2e {mode} run of {records} records failed (exit {done.returncode}); its stderr"
        f" ends:\n{done.stderr[-3000:]}"
    )


def _run_in_own_group(
    args: list[str], env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run the worker in a session of its own; on any exit path, end that process group:
    the forkserver and step processes of a multiprocess run would otherwise outlive an
    interrupted worker."""
    with subprocess.Popen(
        args,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as worker:
        try:
            stdout, stderr = worker.communicate(timeout=timeout)
        finally:
            _end_group(worker.pid)
    return subprocess.CompletedProcess(args, worker.returncode, stdout, stderr)


def _end_group(pgid: int) -> None:
    """SIGTERM, then SIGKILL, to the worker's own process group (created by us)."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def overhead_share(result: dict[str, Any]) -> float:
    """Share of the wall time outside page reads, process_pages and the finalizer tick."""
    parallel = result["workers"] if result["mode"] == "multiprocess" else 1
    ours = result["source"] + result["page"] / parallel + result["finalize_s"]
    return max(0.0, 1 - ours / result["wall_s"])


def e2e_figures(runs: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Figures from the runs keyed ``in_process``, ``in_process_small``, ``multiprocess``,
    ``multiprocess_small``."""
    big, small = runs["in_process"], runs["in_process_small"]
    mp, mp_small = runs["multiprocess"], runs["multiprocess_small"]
    return {
        "e2e_records_per_s_in_process": big["records"] / big["wall_s"],
        "e2e_records_per_s_multiprocess": mp["records"] / mp["wall_s"],
        "e2e_seconds_in_process": big["wall_s"],
        "e2e_seconds_multiprocess": mp["wall_s"],
        "e2e_finalize_s_in_process": big["finalize_s"],
        "dagster_overhead_share": overhead_share(big),
        "dagster_overhead_share_multiprocess": overhead_share(mp),
        "e2e_process_page_records_per_s": big["records"] / big["page"],
        "e2e_steps_in_process": big["steps"],
        "e2e_steps_multiprocess": mp["steps"],
        "e2e_dagster_events_in_process": big["dagster_events"],
        "peak_rss_mb_e2e": big["peak_rss_mb"],
        "peak_rss_mb_e2e_small": small["peak_rss_mb"],
        "peak_rss_growth_ratio": big["peak_rss_mb"] / small["peak_rss_mb"],
        "peak_rss_mb_e2e_multiprocess": mp["peak_rss_mb"],
        "peak_rss_mb_e2e_multiprocess_small": mp_small["peak_rss_mb"],
        "peak_rss_growth_ratio_multiprocess": mp["peak_rss_mb"] / mp_small["peak_rss_mb"],
    }


def e2e_profile(servers: BenchServers, records: int) -> tuple[list[Share], list[Share]]:
    """A profiled in-process run (not one of the timed ones): its time by phase, and its
    own time by package."""
    result = run_worker(servers, "in_process", records, profile=True)
    phases = [Share(**share) for share in result["profile_phases"]]
    return phases, [Share(**share) for share in result["profile_packages"]]
