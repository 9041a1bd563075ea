"""End to end through real Dagster executions and real finalizer sensor ticks, on real
Redis and real PostgreSQL/SQLite, with a real HTTP API on 127.0.0.1. Nothing is faked."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dagster as dg
import pytest

from flow_assets.dispatch import JobBatch
from flow_assets.flow import Flow
from flow_assets.sources import HttpJsonSource, JSONCursorPaginator, PageNumberPaginator
from resources.counts import Counts
from tests.flowkit import (
    assert_conserved,
    assert_counts,
    latest_check,
    latest_materialization_metadata,
    make_defs,
    row_of,
    run_flow,
    run_keys_left,
    status_tag,
    tick,
)
from tests.httpfixture import serve_records

UNIQUE = 1200
DUPLICATES = 150


def records_with_duplicates() -> list[dict[str, object]]:
    """1,350 records: 1,200 unique ids, 150 of them sent a second time on a later page."""
    records: list[dict[str, object]] = [{"id": f"r{i:05d}", "value": i} for i in range(UNIQUE)]
    for i in range(DUPLICATES):
        records.insert(100 + 8 * i, {"id": f"r{i * 7:05d}", "value": -1})
    return records


def page_number_flow(
    api: str, name: str, handler: Callable[[JobBatch], None], **options: Any
) -> Flow:
    """A flow over the test API's page-number pages (random access: the total is known)."""
    source = HttpJsonSource(
        api, paginator=PageNumberPaginator(total_pages_path="total_pages"), records_path="items"
    )
    return Flow(name=name, source=source, key="id", handler=handler, **options)


def collect_handler(seen: list[str]):
    def handler(batch: JobBatch) -> None:
        seen.extend(batch.keys)

    return handler


@pytest.mark.parametrize("style", ["page_number", "cursor"])
def test_duplicates_give_partial_success_with_exact_counts(
    style: str, redis_url: str, database_url: str, instance: dg.DagsterInstance
) -> None:
    records = records_with_duplicates()
    dispatched: list[str] = []
    with serve_records(records, page_size=50, style=style) as api:
        paginator = (
            PageNumberPaginator(total_pages_path="total_pages")
            if style == "page_number"
            else JSONCursorPaginator(cursor_path="next_cursor", cursor_param="cursor")
        )
        flow = Flow(
            name="api_orders",
            source=HttpJsonSource(api, paginator=paginator, records_path="items"),
            key="id",
            handler=collect_handler(dispatched),
            pages_per_step=4,
        )
        defs = make_defs([flow], redis_url, database_url)
        result = run_flow(defs, "api_orders", instance)
    assert result.success

    assert row_of(database_url, result.run_id).flow_status == "running"  # until the sensor ticks
    tick(defs, instance)

    row = row_of(database_url, result.run_id)
    assert row.flow_status == "partial_success"
    assert_counts(
        row,
        Counts(source=UNIQUE + DUPLICATES, dispatched=UNIQUE, skipped=DUPLICATES, completed=UNIQUE),
    )
    assert_conserved(row)
    assert row.pages_done == row.pages_total == 27
    assert row.failure_reason == f"{DUPLICATES} duplicates skipped"
    assert sorted(dispatched) == sorted({str(r["id"]) for r in records})  # each id once
    assert run_keys_left(redis_url) == []
    assert status_tag(instance, result.run_id) == "partial_success"
    metadata = latest_materialization_metadata(instance, "api_orders")
    assert metadata["source_record_count"] == UNIQUE + DUPLICATES
    assert metadata["skipped_records"] == DUPLICATES
    assert metadata["flow_status"] == "partial_success"
    check = latest_check(instance, "api_orders")
    assert check.passed is False
    assert check.severity == dg.AssetCheckSeverity.WARN


def test_unique_records_give_completed(
    redis_url: str, database_url: str, instance: dg.DagsterInstance
) -> None:
    records = [{"id": i} for i in range(333)]
    with serve_records(records, page_size=40, style="page_number") as api:
        flow = page_number_flow(api, "api_customers", lambda batch: None)
        defs = make_defs([flow], redis_url, database_url)
        result = run_flow(defs, "api_customers", instance)
        tick(defs, instance)
    row = row_of(database_url, result.run_id)
    assert row.flow_status == "completed"
    assert_counts(row, Counts(333, 333, 0, 0, 333, 0))
    assert row.failure_reason is None
    assert run_keys_left(redis_url) == []
    assert status_tag(instance, result.run_id) == "completed"
    assert latest_check(instance, "api_customers").passed is True


def test_empty_source_is_completed(
    redis_url: str, database_url: str, instance: dg.DagsterInstance
) -> None:
    with serve_records([], page_size=10, style="page_number") as api:
        flow = page_number_flow(api, "api_empty", lambda batch: None)
        defs = make_defs([flow], redis_url, database_url)
        result = run_flow(defs, "api_empty", instance)
        tick(defs, instance)
    row = row_of(database_url, result.run_id)
    assert result.success
    assert row.flow_status == "completed"
    assert_counts(row, Counts())


def test_a_retried_page_counts_once_and_owns_its_keys(
    redis_url: str, database_url: str, instance: dg.DagsterInstance
) -> None:
    """The handler fails the first page of each step after handling half of it, on the
    step's first attempt only: Dagster's RetryPolicy re-runs the step, and the run's counts
    are as if nothing failed (pages replace their earlier attempt; keys are still theirs)."""
    records = [{"id": i} for i in range(200)] + [{"id": 5}, {"id": 150}]  # 2 real duplicates
    failed_once: set[str] = set()
    handled: list[str] = []

    def flaky(batch: JobBatch) -> None:
        half = len(batch) // 2
        for key in batch.keys[:half]:
            batch.complete(key)
        handled.extend(batch.keys[:half])
        first = batch.keys[0]
        if int(first) % 75 == 0 and first not in failed_once:  # pages 0, 3, 6: chunk starts
            failed_once.add(first)
            raise ConnectionError("downstream hiccup (first attempt)")
        handled.extend(batch.keys[half:])

    with serve_records(records, page_size=25, style="page_number") as api:
        flow = page_number_flow(
            api,
            "flaky_flow",
            flaky,
            pages_per_step=3,
            retry_policy=dg.RetryPolicy(max_retries=2),
        )
        defs = make_defs([flow], redis_url, database_url)
        result = run_flow(defs, "flaky_flow", instance)
        tick(defs, instance)

    assert result.success
    retries = result.filter_events(lambda e: e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY)
    assert len(retries) == 3  # 9 pages of 25 in chunks of 3: each chunk failed once
    assert len(handled) > 200  # the failed attempts really did work before failing
    row = row_of(database_url, result.run_id)
    assert row.flow_status == "partial_success"
    assert_counts(row, Counts(source=202, dispatched=200, skipped=2, completed=200))
    assert_conserved(row)
    assert run_keys_left(redis_url) == []


def test_a_second_tick_changes_nothing(
    redis_url: str, database_url: str, instance: dg.DagsterInstance
) -> None:
    with serve_records([{"id": i} for i in range(30)], page_size=10) as api:
        flow = page_number_flow(api, "twice", lambda batch: None)
        defs = make_defs([flow], redis_url, database_url)
        result = run_flow(defs, "twice", instance)
    first = tick(defs, instance)
    before = row_of(database_url, result.run_id)
    second = tick(defs, instance)
    after = row_of(database_url, result.run_id)
    assert first.skip_reason is None
    assert second.skip_reason is not None
    assert "finalized: none" in str(second.skip_reason.skip_message)
    assert before == after
    materializations = instance.fetch_materializations(dg.AssetKey(["flows", "twice"]), limit=10)
    assert len(materializations.records) == 1
