"""One end-to-end run in a fresh process: ``python -m bench.e2e_worker '<json spec>'``.

A fresh process per run, so that its peak memory belongs to that run alone. Prints one
line ``BENCH_RESULT <json>`` with the timings, peak RSS and the finalized row's status.

Spec keys: mode (``in_process`` | ``multiprocess``), records, data_path, redis_url,
database_url, dagster_home, timing_dir, workers, profile (bool, in-process only).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg

from bench import data, e2e_flow
from bench.memory import RssSampler
from bench.profiling import package_breakdown, phase_breakdown, profile
from flow_assets.cli.runner import QUIET_RUN_CONFIG, finalize_now, run_flow
from resources.counts import Counts
from resources.ledger.ledger import Ledger
from resources.ledger.records import RunRow

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH_RESULT "

#: Phases of a profiled in-process execution (the finalizer tick after it is left out: it
#: has its own profile): label -> (file suffix, function).
RUN_PHASES: dict[str, tuple[str, str]] = {
    "ours: process_pages": ("flow_assets/page_step.py", "process_pages"),
    "ours: FileSource plan (scan for page starts)": ("flow_assets/sources/files.py", "plan"),
    "ours: FileSource page reads (JSON parsing)": ("flow_assets/sources/files.py", "fetch"),
    "Dagster: event log writes (handle_new_event)": (
        "dagster/_core/instance/methods/event_methods.py",
        "handle_new_event",
    ),
}
_RUN_TOTAL = ("dagster/_core/definitions/job_definition.py", "execute_in_process")


def _in_process(
    spec: dict[str, Any], defs: dg.Definitions, instance: dg.DagsterInstance, out: dict[str, Any]
) -> RunRow:
    phases: dict[str, float] = {}

    @contextmanager
    def timed(message: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        phases[message.split()[0]] = time.perf_counter() - started

    row = run_flow(defs, e2e_flow.FLOW_NAME, instance=instance, progress=timed)
    out["execute_s"], out["finalize_s"] = phases["running"], phases["finalizing"]
    out["run_id"] = row.run_id
    return row


def _multiprocess(
    spec: dict[str, Any], defs: dg.Definitions, instance: dg.DagsterInstance, out: dict[str, Any]
) -> RunRow:
    kwargs = {k: spec[k] for k in ("database_url", "redis_url", "data_path", "timing_dir")}
    job = dg.build_reconstructable_job(
        "bench.e2e_flow",
        "build_job",
        reconstructable_kwargs=kwargs,
        reconstructor_working_directory=str(REPO_ROOT),
    )
    executor = {"start_method": {"forkserver": {}}, "max_concurrent": spec["workers"]}
    run_config = {**QUIET_RUN_CONFIG, "execution": {"config": {"multiprocess": executor}}}
    started = time.perf_counter()
    with dg.execute_job(job, instance=instance, run_config=run_config) as result:
        if not result.success:
            raise RuntimeError(f"multiprocess run {result.run_id} failed")
        out["run_id"] = result.run_id
    out["execute_s"] = time.perf_counter() - started
    started = time.perf_counter()
    finalize_now(defs, instance)
    out["finalize_s"] = time.perf_counter() - started
    return Ledger(url=spec["database_url"]).runs(run_id=out["run_id"])[0]


def _open_instance(spec: dict[str, Any]) -> dg.DagsterInstance:
    """The run's Dagster instance, created before the clock starts (storage setup)."""
    if spec["mode"] == "in_process":
        return dg.DagsterInstance.local_temp(spec["dagster_home"])
    return dg.DagsterInstance.from_config(spec["dagster_home"])


def step_times(instance: dg.DagsterInstance, run_id: str) -> dict[str, float]:
    """Steps, seconds inside them (STEP_START to STEP_SUCCESS) and events of the run."""
    starts: dict[str, float] = {}
    inside = 0.0
    records = instance.all_logs(run_id)
    for record in records:
        event = record.dagster_event
        if event is None or event.step_key is None:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            starts[event.step_key] = record.timestamp
        elif event.event_type == dg.DagsterEventType.STEP_SUCCESS and event.step_key in starts:
            inside += record.timestamp - starts[event.step_key]
    return {"steps": len(starts), "inside_steps_s": inside, "dagster_events": len(records)}


def _check(row: RunRow, records: int) -> None:
    skipped = data.duplicates_in(records)
    expected = Counts(
        source=records, dispatched=records - skipped, skipped=skipped, completed=records - skipped
    )
    if row.counts != expected or row.flow_status != "partial_success":
        raise RuntimeError(
            f"e2e run {row.run_id} ended {row.flow_status} with {row.counts}, expected"
            f" partial_success with {expected}; reason: {row.failure_reason}"
        )


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Launch the flow, finalize it, and measure; the result as a JSON-ready dict."""
    defs = e2e_flow.build_definitions(
        spec["database_url"], spec["redis_url"], spec["data_path"], spec["timing_dir"]
    )
    # The schema is created once per database, not per run: not part of the timing.
    Ledger(url=spec["database_url"]).upgrade()
    launch = _in_process if spec["mode"] == "in_process" else _multiprocess
    out: dict[str, Any] = {"mode": spec["mode"], "records": spec["records"]}
    with _open_instance(spec) as instance, RssSampler() as sampler:
        out["rss_before_mb"] = sampler.sample() / 2**20
        started = time.perf_counter()
        if spec.get("profile"):
            stats = profile(lambda: out.update(row=launch(spec, defs, instance, out)))
            other = "Dagster: orchestration, IO manager, the rest"
            phases = phase_breakdown(stats, RUN_PHASES, _RUN_TOTAL, other)
            out["profile_phases"] = [vars(share) for share in phases]
            out["profile_packages"] = [vars(share) for share in package_breakdown(stats)]
        else:
            out["row"] = launch(spec, defs, instance, out)
        out["wall_s"] = time.perf_counter() - started
        out.update(step_times(instance, out["run_id"]))
    row: RunRow = out.pop("row")
    _check(row, spec["records"])
    out["status"] = row.flow_status
    out["peak_rss_mb"] = sampler.peak_mb
    out["ru_maxrss_self_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["ru_maxrss_children_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    out.update(e2e_flow.read_timings(spec["timing_dir"]))
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: python -m bench.e2e_worker '<json spec>' (got {argv[1:]})", file=sys.stderr)
        return 2
    result = run(json.loads(argv[1]))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
