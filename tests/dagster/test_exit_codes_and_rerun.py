"""``flowctl run`` / ``flowctl rerun`` exit codes and recovery, through the real console
script in subprocesses: real Dagster runs (on a temporary instance, or the persistent one of
a test ``DAGSTER_HOME``), the test session's real Redis, a SQLite ledger per test, and the
flows of ``tests/dagster/cli_flows.py``. Nothing is faked.

Documented exit codes: 0 completed or partial_success, 1 failed or cancelled (or not final
after --wait), 2 usage or configuration error, 3 partial_success with --strict.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from resources.counts import Counts
from resources.ledger.ledger import Ledger
from resources.ledger.records import RunRow
from tests.dagster import cli_flows
from tests.flowkit import assert_conserved, assert_counts

FLOWCTL = Path(sys.executable).parent / "flowctl"
REPO_ROOT = Path(__file__).resolve().parents[2]
MODULE = ["-m", "tests.dagster.cli_flows"]
RUN_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class Cli:
    """The console script with this test's settings (and no inherited FLOW_/DAGSTER_ ones)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def environ(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOW_", "DAGSTER_"))}
        env.update(self.env)
        env.update(extra)
        return env

    def __call__(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(FLOWCTL), *args],
            env=self.environ(**extra),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(FLOWCTL), *args],
            env=self.environ(),
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "data"
    directory.mkdir()
    cli_flows.write_data(directory)
    return directory


@pytest.fixture
def cli(tmp_path: Path, data_dir: Path, redis_url: str, sqlite_url: str) -> Cli:
    """No DAGSTER_HOME: every run is on a temporary Dagster instance."""
    return Cli(
        {
            "FLOW_HOME": str(tmp_path / "flow_home"),
            "FLOW_REDIS_URL": redis_url,
            "FLOW_DATABASE_URL": sqlite_url,
            "CLI_FLOWS_DIR": str(data_dir),
        }
    )


@pytest.fixture
def dagster_home(tmp_path: Path) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return home


@pytest.fixture
def persistent_cli(cli: Cli, dagster_home: Path) -> Cli:
    return Cli({**cli.env, "DAGSTER_HOME": str(dagster_home)})


def ledger(sqlite_url: str) -> list[RunRow]:
    return Ledger(url=sqlite_url).runs()


def printed_run_id(result: subprocess.CompletedProcess[str]) -> str:
    found = RUN_ID.search(result.stdout)
    assert found, f"no run id in the output:\n{result.stdout}\n{result.stderr}"
    return found[0]


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------------ exit codes


@pytest.mark.parametrize(
    ("args", "marker", "code", "status"),
    [
        pytest.param(["exit_ok"], False, 0, "completed", id="completed-0"),
        pytest.param(["exit_ok", "--strict"], False, 0, "completed", id="completed-strict-0"),
        pytest.param(["exit_partial"], False, 0, "partial_success", id="partial-0"),
        pytest.param(["exit_partial", "--strict"], False, 3, "partial_success", id="partial-3"),
        pytest.param(["exit_failing"], True, 1, "failed", id="failed-1"),
        pytest.param(["exit_rq", "--wait", "0"], False, 1, "running", id="not-final-1"),
    ],
)
def test_run_exits_with_the_code_of_its_final_status(
    cli: Cli, data_dir: Path, sqlite_url: str, args: list[str], marker: bool, code: int, status: str
) -> None:
    if marker:
        (data_dir / "marker").touch()

    result = cli("run", *args, *MODULE)

    assert result.returncode == code, result.stdout + result.stderr
    [row] = ledger(sqlite_url)
    assert (row.flow_name, row.flow_status) == (args[0], status)
    assert row.run_id in result.stdout
    assert "Traceback" not in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        pytest.param(["run", "exit_ok", "--bogus"], {}, "No such option: --bogus", id="option"),
        pytest.param(["run", "nope"], {}, "no flow named 'nope'", id="unknown-flow"),
        pytest.param(
            ["run", "exit_ok", "--partition", "x"], {}, "has no partitions", id="partition"
        ),
        pytest.param(
            ["run", "exit_ok"],
            {"FLOW_DATABASE_URL": "postgres://app:pw@db.internal/flows"},
            "FLOW_DATABASE_URL",
            id="configuration",
        ),
        pytest.param(["rerun"], {}, "Missing argument", id="rerun-no-id"),
    ],
)
def test_usage_and_configuration_errors_exit_2_with_one_line(
    cli: Cli, sqlite_url: str, args: list[str], env: dict[str, str], message: str
) -> None:
    result = cli(*args, *MODULE, **env)

    assert result.returncode == 2, result.stdout + result.stderr
    [line] = error_lines(result)
    assert message in line
    assert "Traceback" not in result.stdout + result.stderr


def test_a_cancelled_run_exits_1(
    persistent_cli: Cli, data_dir: Path, dagster_home: Path, sqlite_url: str
) -> None:
    """Cancelled the way Dagster's run launchers terminate a run: the run is marked
    CANCELING in the instance, then its process gets SIGTERM."""
    (data_dir / "hang").touch()
    process = persistent_cli.popen("run", "exit_slow", *MODULE)
    try:
        deadline = time.monotonic() + 120
        while not (data_dir / "started").exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the slow page never started"
            time.sleep(0.05)
        with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
            [run] = instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
            instance.report_run_canceling(run)
            os.kill(process.pid, signal.SIGTERM)
            time.sleep(0.5)
            (data_dir / "hang").unlink()
            out, err = process.communicate(timeout=120)
            ended = instance.get_run_by_id(run.run_id)
            assert ended is not None and ended.status == dg.DagsterRunStatus.CANCELED
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 1, out + err
    [row] = ledger(sqlite_url)
    assert (row.run_id, row.flow_status) == (run.run_id, "cancelled")
    assert_conserved(row)


# --------------------------------------------------------------------------------- rerun


def test_rerun_recovers_a_failed_run_from_failure(
    persistent_cli: Cli, data_dir: Path, dagster_home: Path, sqlite_url: str
) -> None:
    """The handler fails on page 1 while the marker exists: the run fails (exit 1) with that
    page's 10 jobs failed. Once the marker is gone, ``flowctl rerun <id>`` re-executes the
    failed step alone (its input, the plan's output, read back from DAGSTER_HOME), and the
    same flow run, one ledger row, ends completed with exact counts (exit 0)."""
    (data_dir / "marker").touch()
    failed = persistent_cli("run", "exit_failing", *MODULE)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    root = printed_run_id(failed)
    [row] = ledger(sqlite_url)
    assert (row.run_id, row.flow_status) == (root, "failed")
    assert_counts(row, Counts(source=30, dispatched=30, completed=20, failed=10))

    (data_dir / "marker").unlink()
    recovered = persistent_cli("rerun", root)

    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    [row] = ledger(sqlite_url)
    assert (row.run_id, row.flow_status) == (root, "completed"), row.failure_reason
    assert_counts(row, Counts(source=30, dispatched=30, completed=30))
    assert_conserved(row)
    assert root in recovered.stdout
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        [rerun] = instance.get_runs(dg.RunsFilter(tags={"dagster/root_run_id": root}))
        assert rerun.parent_run_id == root and rerun.status == dg.DagsterRunStatus.SUCCESS
        steps = {
            event.step_key
            for event in instance.all_logs(rerun.run_id)
            if event.dagster_event and event.dagster_event.is_step_success
        }
    # From failure: the failed page step and the collect step ran, the plan and the two
    # pages that had succeeded did not.
    assert steps == {"exit_failing_pages[pages_1_1]", "exit_failing_collect"}

    again = persistent_cli("rerun", root)
    assert again.returncode == 2
    [line] = error_lines(again)
    assert "already ended completed" in line


def test_rerun_all_steps_reexecutes_every_step_and_can_be_repeated(
    persistent_cli: Cli, data_dir: Path, sqlite_url: str
) -> None:
    """--all-steps while the outage lasts fails again (exit 1, same flow run); once it is
    over, the same command on the same id (the group's newest run is the parent) ends the
    flow run completed, every page counted once."""
    (data_dir / "marker").touch()
    failed = persistent_cli("run", "exit_failing", *MODULE)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    root = printed_run_id(failed)

    still_down = persistent_cli("rerun", root, "--all-steps")
    assert still_down.returncode == 1, still_down.stdout + still_down.stderr
    [row] = ledger(sqlite_url)
    assert (row.run_id, row.flow_status) == (root, "failed")
    assert_counts(row, Counts(source=30, dispatched=30, completed=20, failed=10))

    (data_dir / "marker").unlink()
    recovered = persistent_cli("rerun", root, "--all-steps")

    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    [row] = ledger(sqlite_url)
    assert (row.run_id, row.flow_status) == (root, "completed"), row.failure_reason
    assert_counts(row, Counts(source=30, dispatched=30, completed=30))


def test_rerun_without_dagster_home_says_to_set_it(cli: Cli) -> None:
    result = cli("rerun", "0b6c5e8e-7d0c-4a47-9b7e-0e0d6f3c2a11")

    assert result.returncode == 2
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: flowctl rerun needs DAGSTER_HOME")


def test_rerun_of_an_unknown_run_exits_2(persistent_cli: Cli, dagster_home: Path) -> None:
    result = persistent_cli("rerun", "0b6c5e8e-7d0c-4a47-9b7e-0e0d6f3c2a11")

    assert result.returncode == 2
    [line] = error_lines(result)
    assert "no Dagster run '0b6c5e8e-7d0c-4a47-9b7e-0e0d6f3c2a11'" in line
    assert str(dagster_home) in line
