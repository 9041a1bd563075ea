"""A flow's schedule launches a partition's run only when that partition has no run in
progress and no successful final run (unless ``rerun_partitions=True``).

Dagster deduplicates a schedule's ``run_key`` per scheduled execution time only: a
``* * * * *`` schedule on a daily-partitioned flow asked for the newest complete partition
every minute, and each of those runs dispatched all its records again. Here the real
schedule is evaluated at successive tick times against a real Dagster instance and a real
ledger (PostgreSQL), with real runs of the flow in between, finalized by the real sensor.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._core.remote_origin import (  # a queued run's origin: no public constructor
    RegisteredCodeLocationOrigin,
    RemoteJobOrigin,
    RemoteRepositoryOrigin,
)

from flow_assets.dispatch import JobBatch
from flow_assets.flow import Flow
from flow_assets.sources import FileSource
from resources.ledger.ledger import Ledger
from tests.flowkit import make_defs, row_of, run_flow, tick

FLOW = "nightly"
PARTITION = "2026-03-04"
FIRST_TICK = datetime(2026, 3, 5, 0, 1, tzinfo=timezone.utc)  # every minute of 03-05
PARTITION_TAG = "dagster/partition"


def nightly_flow(tmp_path: Path, handler: Any = None, **options: Any) -> Flow:
    data = tmp_path / "nightly.jsonl"
    data.write_text("".join(json.dumps({"id": i}) + "\n" for i in range(30)))
    return Flow(
        name=FLOW,
        source=FileSource(str(data), page_size=10),
        key="id",
        handler=handler or (lambda batch: None),
        partitions=dg.DailyPartitionsDefinition(start_date="2026-01-01"),
        schedule="* * * * *",
        retry_policy=dg.RetryPolicy(max_retries=0),
        **options,
    )


def evaluate(
    defs: dg.Definitions, instance: dg.DagsterInstance, at: datetime
) -> dg.RunRequest | str:
    """One real evaluation of the flow's schedule at tick time ``at``: its run request, or
    its skip message."""
    schedule = defs.resolve_schedule_def(f"{FLOW}_schedule")
    with dg.build_schedule_context(
        instance=instance,
        scheduled_execution_time=at,
        resources=defs.resources,
        repository_def=defs.get_repository_def(),
    ) as context:
        data = schedule.evaluate_tick(context)
    requests = data.run_requests or []
    assert len(requests) <= 1, requests
    if requests:
        return requests[0]
    assert data.skip_message, "neither a run request nor a skip reason"
    return data.skip_message


def launch(
    defs: dg.Definitions, instance: dg.DagsterInstance, request: dg.RunRequest | str
) -> dg.ExecuteInProcessResult:
    assert isinstance(request, dg.RunRequest), f"the tick skipped: {request}"
    assert request.partition_key == PARTITION
    return run_flow(defs, FLOW, instance, partition_key=request.partition_key)


def test_a_partition_with_a_successful_run_is_not_launched_again(
    tmp_path: Path, redis_url: str, postgres_url: str, instance: dg.DagsterInstance
) -> None:
    defs = make_defs([nightly_flow(tmp_path)], redis_url, postgres_url)
    result = launch(defs, instance, evaluate(defs, instance, FIRST_TICK))
    assert result.success

    # The Dagster run is over but the ledger has not finalized it: still in progress.
    skipped = evaluate(defs, instance, FIRST_TICK + timedelta(minutes=1))
    assert isinstance(skipped, str)
    assert f"{PARTITION} has a run in progress" in skipped and result.run_id in skipped

    tick(defs, instance)
    assert row_of(postgres_url, result.run_id).flow_status == "completed"
    for minute in (2, 3):
        skipped = evaluate(defs, instance, FIRST_TICK + timedelta(minutes=minute))
        assert isinstance(skipped, str)
        assert f"{PARTITION} already has a successful run" in skipped
        assert f"{result.run_id} (completed)" in skipped and "rerun_partitions" in skipped
    # The next day's tick asks for the next partition.
    nxt = evaluate(defs, instance, FIRST_TICK + timedelta(days=1))
    assert isinstance(nxt, dg.RunRequest) and nxt.partition_key == "2026-03-05"


def test_a_partition_whose_run_failed_is_launched_again(
    tmp_path: Path, redis_url: str, postgres_url: str, instance: dg.DagsterInstance
) -> None:
    def broken(batch: JobBatch) -> None:
        raise RuntimeError("warehouse unavailable")

    defs = make_defs([nightly_flow(tmp_path, broken)], redis_url, postgres_url)
    result = launch(defs, instance, evaluate(defs, instance, FIRST_TICK))
    assert not result.success
    tick(defs, instance)
    assert row_of(postgres_url, result.run_id).flow_status == "failed"

    again = evaluate(defs, instance, FIRST_TICK + timedelta(minutes=1))
    assert isinstance(again, dg.RunRequest) and again.partition_key == PARTITION


@pytest.mark.parametrize("status", ["QUEUED", "STARTING", "STARTED"])
def test_a_partition_with_a_dagster_run_in_progress_is_skipped(
    status: str, tmp_path: Path, redis_url: str, postgres_url: str, instance: dg.DagsterInstance
) -> None:
    defs = make_defs([nightly_flow(tmp_path)], redis_url, postgres_url)
    job = defs.resolve_job_def(f"{FLOW}_job")
    # A run the daemon submitted for the partition, not yet past its plan (no ledger row);
    # queued runs carry the code location they come from.
    origin = RemoteJobOrigin(
        RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("flows"), "__repository__"), job.name
    )
    run = instance.add_run(
        dg.DagsterRun(
            job_name=job.name,
            status=dg.DagsterRunStatus[status],
            tags={PARTITION_TAG: PARTITION},
            remote_job_origin=origin,
        )
    )
    skipped = evaluate(defs, instance, FIRST_TICK)
    assert isinstance(skipped, str)
    assert f"{PARTITION} has a run in progress" in skipped
    assert f"{run.run_id} ({status.lower()})" in skipped

    # Over, without any ledger row (it failed before its plan): the partition is free.
    instance.report_run_failed(run)
    again = evaluate(defs, instance, FIRST_TICK + timedelta(minutes=1))
    assert isinstance(again, dg.RunRequest) and again.partition_key == PARTITION


def test_a_running_ledger_row_is_a_run_in_progress(
    tmp_path: Path, redis_url: str, postgres_url: str, instance: dg.DagsterInstance
) -> None:
    # E.g. dispatch="rq": the Dagster run is over, jobs are still pending on the workers.
    defs = make_defs([nightly_flow(tmp_path)], redis_url, postgres_url)
    Ledger(url=postgres_url).start_run("rq-run-1", FLOW, PARTITION, datetime.now(timezone.utc))
    Ledger(url=postgres_url).start_run("other-day", FLOW, "2026-03-03", datetime.now(timezone.utc))
    skipped = evaluate(defs, instance, FIRST_TICK)
    assert isinstance(skipped, str)
    assert f"{PARTITION} has a run in progress: rq-run-1 (running)" in skipped


def test_rerun_partitions_launches_a_partition_again_after_success(
    tmp_path: Path, redis_url: str, postgres_url: str, instance: dg.DagsterInstance
) -> None:
    flow = nightly_flow(tmp_path, rerun_partitions=True)
    defs = make_defs([flow], redis_url, postgres_url)
    first = launch(defs, instance, evaluate(defs, instance, FIRST_TICK))
    tick(defs, instance)
    assert row_of(postgres_url, first.run_id).flow_status == "completed"
    second = launch(defs, instance, evaluate(defs, instance, FIRST_TICK + timedelta(minutes=1)))
    assert second.success and second.run_id != first.run_id


def test_partition_runs_lists_a_partitions_runs_newest_first(postgres_url: str) -> None:
    store = Ledger(url=postgres_url)
    start = datetime(2026, 3, 5, tzinfo=timezone.utc)
    for i, (run_id, partition) in enumerate(
        [("a", PARTITION), ("b", PARTITION), ("c", "2026-03-03"), ("d", None)]
    ):
        store.start_run(run_id, FLOW, partition, start + timedelta(minutes=i))
    store.start_run("e", "other_flow", PARTITION, start)
    assert store.partition_runs(FLOW, PARTITION) == [("b", "running"), ("a", "running")]
    assert store.partition_runs(FLOW, "2026-01-01") == []
