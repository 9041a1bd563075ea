"""Recovery paths a user or operator takes, for real: a run whose orchestrator died (SIGKILL,
then failed by "run monitoring") or that was terminated, re-executed from failure and then
with all steps; two code locations sharing one ledger and one Dagster instance; a handler
that works longer than the flow's deadline; a stalled run whose Dagster run then succeeds.
Real Dagster runs (``execute_job`` with reconstructable jobs), real finalizer ticks, real
Redis and PostgreSQL/SQLite. Nothing is faked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from flow_assets.dagster_names import PARENT_RUN_ID_TAG, ROOT_RUN_ID_TAG
from flow_assets.dispatch import JobBatch
from flow_assets.flow import Flow
from flow_assets.sources import FileSource
from resources.counts import Counts
from resources.ledger.ledger import Ledger
from resources.live.counters import LiveCounters
from sensors.finalizer import finalize_runs
from tests.faults import recovery_flows
from tests.flowkit import (
    assert_conserved,
    latest_materialization_metadata,
    make_defs,
    row_of,
    run_flow,
    run_keys_left,
    status_tag,
    tick,
)

pytestmark = [pytest.mark.faults, pytest.mark.dagster]

REPO_ROOT = Path(__file__).resolve().parents[2]
ALL = Counts(
    source=recovery_flows.RECORDS,
    dispatched=recovery_flows.RECORDS,
    completed=recovery_flows.RECORDS,
)
FAULT_PAGE = 5  # in the step [4-5]: the steps [6-7] .. [10-11] never start
SUBPROCESS_TIMEOUT_S = 180.0


def _job_kwargs(tmp_path: Path, database_url: str, redis_url: str, fault: str) -> dict[str, Any]:
    data = recovery_flows.write_data(tmp_path / "records.jsonl")
    return {
        "database_url": database_url,
        "redis_url": redis_url,
        "data_path": str(data),
        "marker_path": str(tmp_path / "interrupted.pid"),
        "fault": fault,
        "fault_page": FAULT_PAGE,
    }


def _reconstructable(kwargs: dict[str, Any]) -> Any:
    return dg.build_reconstructable_job(
        "tests.faults.recovery_flows",
        "build_job",
        reconstructable_kwargs=kwargs,
        reconstructor_working_directory=str(REPO_ROOT),
    )


def _interrupted_run(
    kwargs: dict[str, Any], instance: dg.DagsterInstance, tmp_path: Path
) -> dg.DagsterRun:
    """Run the job until its handler interrupts it; the run as Dagster then records it."""
    log = tmp_path / "orchestrator.log"
    code = "import sys; from tests.faults.recovery_flows import execute; execute(sys.argv[1])"
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, "-c", code, json.dumps(kwargs)],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=SUBPROCESS_TIMEOUT_S,
            check=False,
        )
    [run] = instance.get_runs()
    if kwargs["fault"] == "cancel":
        assert run.status == dg.DagsterRunStatus.CANCELED, log.read_text()[-2000:]
        return run
    assert proc.returncode == -9, log.read_text()[-2000:]
    assert run.status == dg.DagsterRunStatus.STARTED  # nobody is left to say it ended
    # What run monitoring does with a run whose orchestrator is gone.
    instance.report_run_failed(run, "run worker died")
    failed = instance.get_run_by_id(run.run_id)
    assert failed is not None
    return failed


def _reexecute(
    kwargs: dict[str, Any],
    instance: dg.DagsterInstance,
    root: str,
    *,
    from_failure: bool,
) -> dg.DagsterRun:
    options = (
        dg.ReexecutionOptions.from_failure(root, instance)
        if from_failure
        else dg.ReexecutionOptions(parent_run_id=root)
    )
    with dg.execute_job(
        _reconstructable(kwargs),
        instance=instance,
        run_config=recovery_flows.IN_PROCESS,
        tags={PARENT_RUN_ID_TAG: root, ROOT_RUN_ID_TAG: root},  # as the UI tags them
        reexecution_options=options,
    ) as result:
        return result.dagster_run


@pytest.mark.parametrize("fault", ["kill", "cancel"])
def test_a_reexecution_from_failure_that_cannot_reach_unstarted_pages_is_not_final_success(
    fault: str,
    redis_url: str,
    sqlite_url: str,
    instance: dg.DagsterInstance,
    tmp_path: Path,
) -> None:
    """Issue 10 item 1: the interrupted run leaves steps that never started. A re-execution
    from failure must not make the run look complete: the run ends ``failed`` naming the
    missing pages and the recovery; re-executing all steps then completes it exactly."""
    kwargs = _job_kwargs(tmp_path, sqlite_url, redis_url, fault)
    defs = recovery_flows.build_definitions(**kwargs)
    root = _interrupted_run(kwargs, instance, tmp_path).run_id
    store = Ledger(url=sqlite_url)
    missing = store.missing_pages(root)
    assert missing and 11 in missing  # the last steps never started

    rerun = _reexecute(kwargs, instance, root, from_failure=True)
    tick(defs, instance)
    row = row_of(sqlite_url, root)
    if row.counts == ALL:  # Dagster reached every page after all: exact, and completed
        assert row.flow_status == "completed"
    else:
        assert rerun.status == dg.DagsterRunStatus.FAILURE  # collect names the gap
        assert row.flow_status == "failed", row
        reason = row.failure_reason or ""
        assert "never ran" in reason and "re-execute all steps" in reason, reason
        assert "10-11" in reason or "11" in reason, reason
        assert_conserved(row)
        assert status_tag(instance, root) == "failed"
        assert status_tag(instance, rerun.run_id) == "failed"  # item 9a: no stale tag

        full = _reexecute(kwargs, instance, root, from_failure=False)
        assert full.status == dg.DagsterRunStatus.SUCCESS
        tick(defs, instance)
        row = row_of(sqlite_url, root)
        assert (row.flow_status, row.counts) == ("completed", ALL), row
        assert row.failure_reason is None
        # Item 9b: the finalizer removed the keys itself; that is no Redis loss.
        assert row.counter_mismatch is None, row.counter_mismatch
        # Item 9a: every Dagster run of the group shows the group's current status.
        for run_id in (root, rerun.run_id, full.run_id):
            assert status_tag(instance, run_id) == "completed", run_id
        # Item 9e: the re-finalized run is a revision of the same flow run.
        metadata = latest_materialization_metadata(instance, recovery_flows.FLOW_NAME)
        assert metadata["flow_run_id"] == root
        assert metadata["flow_run_revision"] == row.revision == 2
    assert run_keys_left(redis_url) == []


def _tolerant_flow(path: Path, name: str, max_failed_jobs: int) -> Flow:
    def fail_every_third(batch: JobBatch) -> None:
        for record in batch:
            if int(record["id"]) % 3 == 0:
                batch.fail(record, ValueError("refused"))

    return Flow(
        name=name,
        source=FileSource(path, page_size=10),
        key="id",
        handler=fail_every_third,
        max_failed_jobs=max_failed_jobs,
    )


def test_a_reexecution_of_a_completed_run_fails_and_changes_nothing(
    tmp_path: Path, sqlite_url: str, redis_url: str, instance: dg.DagsterInstance
) -> None:
    """The Dagster UI lets a user re-execute a run whose flow run ended completed: the
    final row stands (a new run reads the source again), so the re-execution fails at its
    first step, naming the fix, and writes nothing: not the plan, not Redis."""
    kwargs = {**_job_kwargs(tmp_path, sqlite_url, redis_url, "kill"), "fault_page": 999}
    with dg.execute_job(
        _reconstructable(kwargs), instance=instance, run_config=recovery_flows.IN_PROCESS
    ) as first:
        assert first.success
        root = first.run_id
    defs = recovery_flows.build_definitions(**kwargs)
    tick(defs, instance)
    done = row_of(sqlite_url, root)
    assert done.flow_status == "completed"

    rerun = _reexecute(kwargs, instance, root, from_failure=False)
    assert rerun.status == dg.DagsterRunStatus.FAILURE
    failures = instance.all_logs(rerun.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    message = failures[0].dagster_event.step_failure_data.error.message  # type: ignore[union-attr]
    assert f"run {root} already ended completed" in message
    assert "Launch a new run" in message
    tick(defs, instance)
    assert row_of(sqlite_url, root) == done
    assert run_keys_left(redis_url) == []
    assert status_tag(instance, root) == "completed"


def test_a_run_is_decided_by_its_own_flows_policy_whichever_code_location_ticks(
    redis_url: str, postgres_url: str, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    """Issue 10 item 3: two code locations share one ledger and one Dagster instance. A run
    of location A's flow, which tolerates 100 failed jobs, has 20 failures; location B's
    finalizer ticks first. The run is ``partial_success`` (its own policy), not ``failed``."""
    data = recovery_flows.write_data(tmp_path / "records.jsonl")
    location_a = make_defs([_tolerant_flow(data, "tolerant", 100)], redis_url, postgres_url)
    location_b = make_defs([_tolerant_flow(data, "strict", 0)], redis_url, postgres_url)
    result = run_flow(location_a, "tolerant", instance)
    assert result.success

    tick(location_b, instance)  # the other location's sensor decides with the run's policy
    row = row_of(postgres_url, result.run_id)
    assert row.flow_status == "partial_success", row.failure_reason
    assert row.counts == Counts(60, 60, 0, 0, 40, 20)
    assert row.failure_reason == "20 jobs failed (tolerated)"

    # A row of an older release (no recorded policy) of a flow B does not define: B's
    # finalizer leaves it to its own code location, and says so.
    store = Ledger(url=postgres_url)
    store.start_run("legacy-run", "tolerant", None, datetime.now(timezone.utc))
    report = finalize_runs(instance, store, LiveCounters(url=redis_url), {})
    assert report.not_ours == ["legacy-run"] and "not defined" in report.waiting["legacy-run"]
    assert "left to their own code location: 1" in report.summary()
    assert row_of(postgres_url, "legacy-run").flow_status == "running"


def test_a_handler_working_past_the_deadline_keeps_its_run_alive(
    redis_url: str, postgres_url: str, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    """Issue 10 item 4: the step heartbeats while its handler works, so finalizer ticks
    during a handler call 2.5 times longer than the deadline leave the run running; it is
    ``completed`` once the Dagster run ends. The finalizer uses its own instance object, as
    the sensor does in the daemon. (The deadline is short, yet longer than Dagster's own
    time between two steps, when no step heartbeats, even on a loaded machine: 2 s was not.)"""
    deadline = timedelta(seconds=5)

    def slow(batch: JobBatch) -> None:
        time.sleep(2.5 * deadline.total_seconds())

    flow = Flow(
        name="slow",
        source=FileSource(recovery_flows.write_data(tmp_path / "r.jsonl"), page_size=60),
        key="id",
        handler=slow,
        deadline=deadline,
    )
    defs = make_defs([flow], redis_url, postgres_url)
    store, counters = Ledger(url=postgres_url), LiveCounters(url=redis_url)
    verdicts: list[dict[str, str]] = []
    done = threading.Event()

    def finalizer() -> None:
        with dg.DagsterInstance.from_ref(instance.get_ref()) as own_instance:
            while not done.wait(0.25):
                verdicts.append(finalize_runs(own_instance, store, counters, {}).finalized)

    ticker = threading.Thread(target=finalizer)
    ticker.start()
    try:
        result = run_flow(defs, flow.name, instance)
    finally:
        done.set()
        ticker.join()
    assert result.success
    assert len(verdicts) >= 12  # the finalizer looked at the run all along
    assert [finalized for finalized in verdicts if finalized] == []
    tick(defs, instance)
    row = row_of(postgres_url, result.run_id)
    assert (row.flow_status, row.counts) == ("completed", ALL)


@pytest.mark.parametrize("outcome", ["succeeds", "fails"])
def test_a_run_declared_stalled_is_decided_again_when_its_dagster_run_ends(
    outcome: str, redis_url: str, postgres_url: str, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    """Issue 10 item 4: a finalizer whose clock says the deadline passed declares the
    working run ``failed`` (stalled). When the Dagster run then ends, the next tick reopens
    the row and decides it from the settled ledger, a second revision of the same run:
    ``completed`` when it succeeded; ``failed`` for the Dagster failure, not a stall."""
    release = threading.Event()
    working = threading.Event()

    def held(batch: JobBatch) -> None:
        working.set()
        assert release.wait(60), "the test never released the handler"
        if outcome == "fails":
            raise dg.Failure("downstream refused the page", allow_retries=False)

    flow = Flow(
        name="held",
        source=FileSource(recovery_flows.write_data(tmp_path / "r.jsonl"), page_size=60),
        key="id",
        handler=held,
        deadline=timedelta(minutes=5),
    )
    defs = make_defs([flow], redis_url, postgres_url)
    store, counters = Ledger(url=postgres_url), LiveCounters(url=redis_url)
    results: list[dg.ExecuteInProcessResult] = []
    runner = threading.Thread(target=lambda: results.append(run_flow(defs, flow.name, instance)))
    runner.start()
    try:
        assert working.wait(60)
        later = datetime.now(timezone.utc) + timedelta(minutes=10)
        report = finalize_runs(instance, store, counters, {}, now=later)
        [(run_id, status)] = report.finalized.items()
        assert status == "failed"
        row = row_of(postgres_url, run_id)
        assert row.failure_reason and row.failure_reason.startswith("stalled")
        assert row.awaiting_dagster
    finally:
        release.set()
        runner.join()
    assert results[0].success is (outcome == "succeeds")

    report = finalize_runs(instance, store, counters, {})
    expected = "completed" if outcome == "succeeds" else "failed"
    assert report.reopened == [run_id] and report.finalized == {run_id: expected}
    row = row_of(postgres_url, run_id)
    assert (row.flow_status, row.revision, row.awaiting_dagster) == (expected, 2, False)
    assert_conserved(row)
    if outcome == "succeeds":
        assert row.counts == ALL and row.failure_reason is None
    else:
        reason = row.failure_reason or ""
        assert reason.startswith("Dagster run failed") and "downstream refused" in reason
    assert status_tag(instance, run_id) == expected


def test_total_runtime_is_working_time_not_the_finalizers_wait(
    redis_url: str, sqlite_url: str, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    """Issue 10 item 9c: ``total_runtime_ms`` is the Dagster run's duration (summed over a
    re-execution group), not the time until the finalizer's tick."""
    flow = Flow(
        name="quick",
        source=FileSource(recovery_flows.write_data(tmp_path / "r.jsonl"), page_size=10),
        key="id",
        handler=lambda batch: None,
    )
    defs = make_defs([flow], redis_url, sqlite_url)
    result = run_flow(defs, flow.name, instance)
    time.sleep(2.0)  # the sensor's wait
    tick(defs, instance)
    [record] = instance.get_run_records(dg.RunsFilter(run_ids=[result.run_id]))
    assert record.start_time is not None and record.end_time is not None
    duration_ms = (record.end_time - record.start_time) * 1000
    row = row_of(sqlite_url, result.run_id)
    assert row.total_runtime_ms is not None
    assert abs(row.total_runtime_ms - duration_ms) <= 1, (row.total_runtime_ms, duration_ms)
