"""dedup="flow" through real Dagster runs (in-process executor, re-execution from failure) and
real finalizer ticks, on real Redis and real PostgreSQL/SQLite over JSONL files; nothing faked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from resources.counts import Counts
from resources.ledger.ledger import Ledger
from tests.dagster import dedup_flows
from tests.dagster.dedup_flows import FLOW_NAME, IN_PROCESS, handled_keys, write_partition
from tests.flowkit import (
    assert_conserved,
    assert_counts,
    row_of,
    run_flow,
    run_keys_left,
    status_tag,
    tick,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DAY1 = [f"o{n:03d}" for n in range(300)]  # 6 pages
DAY2 = [f"o{n:03d}" for n in range(200, 500)] + ["o450"]  # overlaps DAY1 on o200-o299


@pytest.fixture
def flow_kwargs(tmp_path: Path, redis_url: str, database_url: str) -> dict[str, Any]:
    data = tmp_path / "data"
    data.mkdir()
    write_partition(data, "day1", DAY1)
    write_partition(data, "day2", DAY2)
    return {
        "database_url": database_url,
        "redis_url": redis_url,
        "data_dir": str(data),
        "broken_path": str(tmp_path / "downstream_down"),
        "handled_path": str(tmp_path / "handled.txt"),
    }


def run_partition(defs: dg.Definitions, instance: dg.DagsterInstance, partition: str) -> str:
    result = run_flow(defs, FLOW_NAME, instance, partition_key=partition)
    assert result.success
    tick(defs, instance)
    return result.run_id


@pytest.mark.parametrize(
    ("dedup", "second"),
    [
        ("flow", Counts(source=301, dispatched=200, skipped=101, completed=200)),
        ("run", Counts(source=301, dispatched=300, skipped=1, completed=300)),
    ],
)
def test_an_incremental_run_skips_exactly_what_earlier_runs_dispatched(
    dedup: str, second: Counts, flow_kwargs: dict[str, Any], instance: dg.DagsterInstance
) -> None:
    defs = dedup_flows.build_definitions(**flow_kwargs, dedup=dedup)
    database_url, handled = flow_kwargs["database_url"], flow_kwargs["handled_path"]

    first_run = run_partition(defs, instance, "day1")
    row = row_of(database_url, first_run)
    assert row.flow_status == "completed"
    assert_counts(row, Counts(source=300, dispatched=300, completed=300))
    assert handled_keys(handled) == DAY1
    Path(handled).unlink()

    second_run = run_partition(defs, instance, "day2")
    row = row_of(database_url, second_run)
    assert row.flow_status == "partial_success"
    assert_counts(row, second)
    assert_conserved(row)
    assert row.failure_reason == f"{second.skipped} duplicates skipped"
    assert row.pages_done == row.pages_total == 7
    expected = DAY2[100:300] if dedup == "flow" else DAY2[:300]
    assert sorted(handled_keys(handled)) == expected  # each new id once, no old id
    assert status_tag(instance, second_run) == "partial_success"
    assert run_keys_left(flow_kwargs["redis_url"]) == []


def test_a_retried_step_keeps_its_own_keys(
    flow_kwargs: dict[str, Any], instance: dg.DagsterInstance
) -> None:
    """The page holding o260 fails once mid-step; Dagster's retry re-runs the step, whose
    pages (one already claimed and recorded) must not see their own keys as duplicates."""
    Path(flow_kwargs["broken_path"]).touch()
    defs = dedup_flows.build_definitions(**flow_kwargs, fail_once=True, retries=1)

    result = run_flow(defs, FLOW_NAME, instance, partition_key="day1")
    tick(defs, instance)

    assert result.success
    retries = result.filter_events(lambda e: e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY)
    assert len(retries) == 1
    row = row_of(flow_kwargs["database_url"], result.run_id)
    assert row.flow_status == "completed"
    assert_counts(row, Counts(source=300, dispatched=300, completed=300))
    handled = handled_keys(flow_kwargs["handled_path"])
    assert sorted(set(handled)) == DAY1
    assert len(handled) == 300 + 50  # page 4 of the failed chunk [4-5] ran twice


def test_a_run_reexecuted_from_failure_keeps_its_own_keys(
    flow_kwargs: dict[str, Any], instance: dg.DagsterInstance
) -> None:
    """Downstream is down for the page holding o260: the run fails and is finalized failed
    with that page's jobs failed. Re-executed from failure once it is back, the flow run (the
    root run id) is reopened, re-claims its own keys, ends completed, and a later run of
    the flow skips them."""
    Path(flow_kwargs["broken_path"]).touch()
    job = dg.build_reconstructable_job(
        "tests.dagster.dedup_flows",
        "build_job",
        reconstructable_kwargs=flow_kwargs,
        reconstructor_working_directory=str(REPO_ROOT),
    )
    defs = dedup_flows.build_definitions(**flow_kwargs)
    database_url = flow_kwargs["database_url"]
    tags = {"dagster/partition": "day1"}

    with dg.execute_job(job, instance=instance, run_config=IN_PROCESS, tags=tags) as failed:
        assert not failed.success
        root = failed.run_id
    store = Ledger(url=database_url)
    # The step's last attempt failed the page's jobs with the handler's error.
    assert store.page_counts(root)[5] == Counts(source=50, dispatched=50, failed=50)
    tick(defs, instance)
    row = row_of(database_url, root)
    assert row.flow_status == "failed"
    assert "HandlerError" in (row.failure_reason or "")

    Path(flow_kwargs["broken_path"]).unlink()
    reexecution = dg.ReexecutionOptions.from_failure(root, instance)
    with dg.execute_job(
        job, instance=instance, run_config=IN_PROCESS, tags=tags, reexecution_options=reexecution
    ) as rerun:
        assert rerun.success
        assert rerun.dagster_run.root_run_id == root
    tick(defs, instance)

    row = row_of(database_url, root)
    assert row.flow_status == "completed", row.failure_reason
    assert_counts(row, Counts(source=300, dispatched=300, completed=300))
    assert sorted(set(handled_keys(flow_kwargs["handled_path"]))) == DAY1
    assert status_tag(instance, root) == "completed"

    later = run_partition(defs, instance, "day2")
    assert_counts(
        row_of(database_url, later), Counts(source=301, dispatched=200, skipped=101, completed=200)
    )
