"""A source that goes down fails the run fast; a plan step that meets a short outage is
retried. Real HTTP server on 127.0.0.1 (stopped for real mid-run), real Dagster runs,
Redis and the ledger on the test's servers.

Bounded without timing anything: the HTTP attempts are counted from urllib3's own retry
warnings, the step attempts from Dagster's events.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Any

import dagster as dg
import pytest

from flow_assets.dispatch import JobBatch
from flow_assets.flow import Flow
from flow_assets.sources import HttpJsonSource, JSONCursorPaginator, PageNumberPaginator
from resources.counts import Counts
from resources.ledger.ledger import Ledger
from tests.flowkit import assert_counts, make_defs, row_of, run_flow, tick
from tests.httpfixture import serve_records

FLOW = "down_api"
RECORDS = [{"id": i} for i in range(50)]
HTTP_RETRIES = 2
FAST: dict[str, Any] = {"max_retries": HTTP_RETRIES, "backoff_factor": 0.01}


def events_of(result: dg.ExecuteInProcessResult, kind: dg.DagsterEventType, op: str) -> list:
    return [
        e for e in result.all_events if e.event_type == kind and (e.step_key or "").startswith(op)
    ]


def failure_text(event: dg.DagsterEvent) -> str:
    error = event.step_failure_data.error
    assert error is not None
    return error.message


def test_a_dead_source_fails_every_page_step_at_once_with_one_error(
    redis_url: str,
    postgres_url: str,
    instance: dg.DagsterInstance,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stack = ExitStack()
    api = stack.enter_context(serve_records(RECORDS, 10, style="page_number"))

    def stop_the_api_after_the_first_page(batch: JobBatch) -> None:
        stack.close()  # the API server is shut down and its port closed: the source is dead

    source = HttpJsonSource(
        api.url,
        paginator=PageNumberPaginator(total_pages_path="total_pages"),
        records_path="items",
        name="orders_api",
        **FAST,
    )
    flow = Flow(
        name=FLOW,
        source=source,
        key="id",
        handler=stop_the_api_after_the_first_page,
        pages_per_step=1,
        retry_policy=dg.RetryPolicy(max_retries=2, delay=0.1),
    )
    defs = make_defs([flow], redis_url, postgres_url)
    try:
        with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"):
            result = run_flow(defs, FLOW, instance)
    finally:
        stack.close()
    assert not result.success

    steps = f"{FLOW}_pages"
    succeeded = {e.step_key for e in events_of(result, dg.DagsterEventType.STEP_SUCCESS, steps)}
    failed = events_of(result, dg.DagsterEventType.STEP_FAILURE, steps)
    assert succeeded == {f"{steps}[pages_0_0]"}
    assert sorted(e.step_key for e in failed) == [f"{steps}[pages_{i}_{i}]" for i in (1, 2, 3, 4)]
    # No Dagster retry of a page step: each failed step had one attempt.
    assert events_of(result, dg.DagsterEventType.STEP_UP_FOR_RETRY, steps) == []
    # Only the step that found the source down spent HTTP retries: one request's worth.
    retried = [r for r in caplog.records if r.getMessage().startswith("Retrying")]
    assert len(retried) == HTTP_RETRIES, [r.getMessage() for r in retried]

    # Every page step names the same error: the first one, as the ledger recorded it.
    down = Ledger(url=postgres_url).source_down(result.run_id, attempt=result.run_id)
    assert down is not None
    assert "Source 'orders_api', page 1" in down and f"after {HTTP_RETRIES} retries" in down
    assert "Fix: check that the server is up" in down
    for event in failed:
        assert down in failure_text(event), failure_text(event)

    tick(defs, instance)
    row = row_of(postgres_url, result.run_id)
    assert row.flow_status == "failed"
    assert row.counts.source == 10  # page 0 was read and counted; nothing else


def test_the_plan_step_is_retried_after_an_outage(
    redis_url: str, postgres_url: str, instance: dg.DagsterInstance
) -> None:
    dispatched: list[str] = []
    with serve_records(RECORDS, 10, style="cursor") as api:
        # Page 2 fails longer than the HTTP retries last (every attempt of its request).
        api.inject(status=503, query={"cursor": "c20"}, times=HTTP_RETRIES + 1)
        source = HttpJsonSource(
            api.url, paginator=JSONCursorPaginator(), records_path="items", **FAST
        )
        flow = Flow(
            name=FLOW,
            source=source,
            key="id",
            handler=lambda batch: dispatched.extend(batch.keys),
            pages_per_step=2,
            retry_policy=dg.RetryPolicy(max_retries=2, delay=0.1),
        )
        defs = make_defs([flow], redis_url, postgres_url)
        result = run_flow(defs, FLOW, instance)
        assert api.count_requests(cursor="c20") == HTTP_RETRIES + 2  # 3 x 503, then 200
    assert result.success
    assert len(events_of(result, dg.DagsterEventType.STEP_UP_FOR_RETRY, f"{FLOW}_plan")) == 1
    tick(defs, instance)
    row = row_of(postgres_url, result.run_id)
    assert row.flow_status == "completed", row.failure_reason
    assert_counts(row, Counts(source=50, dispatched=50, completed=50))
    assert sorted(dispatched, key=int) == [str(r["id"]) for r in RECORDS]
