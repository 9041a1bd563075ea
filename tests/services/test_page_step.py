"""A step's pages through ``process_pages``: what the ledger and Redis hold after a handler
error on a retried attempt, on the final attempt, after a crash, and after the retry. Real
Redis, the ledger on real SQLite and PostgreSQL; the handlers are the test's own."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timezone

import pytest

from flow_assets.dispatch import JobBatch
from flow_assets.errors import HandlerError
from flow_assets.flow import Flow
from flow_assets.page_step import process_pages
from flow_assets.sources.base import Page
from resources.counts import Counts
from resources.ledger.ledger import Ledger
from resources.live.counters import LiveCounters
from tests.flowkit import NoSource

pytestmark = pytest.mark.services
FLOW = "step_flow"
# Three pages of a step; page 1 repeats a key of page 0 and holds a record without an id.
PAGES = [
    Page(0, [{"id": "a"}, {"id": "b"}]),
    Page(1, [{"id": "b"}, {"id": "c"}, {"name": "no id"}]),
    Page(2, [{"id": "d"}, {"id": "e"}]),
]
DISPATCHED = {
    0: Counts(source=2, dispatched=2),
    1: Counts(source=3, dispatched=1, skipped=1, rejected=1),
    2: Counts(source=2, dispatched=2),
}


class Crash(BaseException):
    """The step process dying inside the handler (not an Exception: nothing catches it)."""


FIRST_JOB = {0: "a", 1: "c", 2: "d"}  # each page's first job after dedup


def failing_on(page_index: int, error: BaseException) -> Callable[[JobBatch], None]:
    """A handler that settles the page's first job, then raises ``error``."""

    def handler(batch: JobBatch) -> None:
        if batch.keys and batch.keys[0] == FIRST_JOB[page_index]:
            batch.complete(batch.keys[0])
            raise error

    return handler


def setup(store: Ledger, redis_url: str) -> tuple[str, LiveCounters]:
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    counters = LiveCounters(url=redis_url)
    store.start_run(run_id, FLOW, None, datetime.now(timezone.utc))
    counters.start_run(FLOW, run_id)
    return run_id, counters


def flow_with(handler: Callable[[JobBatch], None]) -> Flow:
    return Flow(name=FLOW, source=NoSource(), key="id", handler=handler)


def assert_redis_mirrors_ledger(store: Ledger, counters: LiveCounters, run_id: str) -> None:
    assert counters.totals(FLOW, run_id) == store.page_totals([run_id])[run_id].counts


def test_an_error_on_a_retried_attempt_records_the_pages_before_it_and_leaves_the_rest_pending(
    store: Ledger, redis_url: str
) -> None:
    run_id, counters = setup(store, redis_url)
    flow = flow_with(failing_on(1, ConnectionError("downstream went away")))

    with pytest.raises(HandlerError, match="page 1: the handler raised ConnectionError"):
        process_pages(flow, run_id, PAGES, counters, store)

    pages = store.page_counts(run_id)
    assert pages[0] == Counts(source=2, dispatched=2, completed=2)  # finished before page 1
    assert pages[1] == DISPATCHED[1]  # pending: the retry replaces it
    assert pages[2] == DISPATCHED[2]  # pre-written, its handler never ran
    assert store.page_totals([run_id])[run_id].pages_done == 1
    assert store.job_failures(run_id) == []
    assert_redis_mirrors_ledger(store, counters, run_id)

    retried = process_pages(flow_with(lambda batch: None), run_id, PAGES, counters, store)
    assert retried == Counts(source=7, dispatched=5, skipped=1, rejected=1, completed=5)
    assert store.page_totals([run_id])[run_id].counts == retried  # counted once
    assert_redis_mirrors_ledger(store, counters, run_id)


def test_an_error_on_the_final_attempt_fails_that_pages_jobs_and_still_runs_the_others(
    store: Ledger, redis_url: str
) -> None:
    run_id, counters = setup(store, redis_url)
    ran: list[int] = []

    def handler(batch: JobBatch) -> None:
        ran.append(len(ran))
        failing_on(1, ValueError("refused"))(batch)

    with pytest.raises(HandlerError, match="page 1: the handler raised ValueError: refused"):
        process_pages(flow_with(handler), run_id, PAGES, counters, store, final_attempt=True)

    assert ran == [0, 1, 2]
    pages = store.page_counts(run_id)
    assert pages[1] == Counts(source=3, dispatched=1, skipped=1, rejected=1, completed=1)
    page_totals = store.page_totals([run_id])[run_id]
    assert page_totals.pages_done == 3
    assert page_totals.counts == Counts(source=7, dispatched=5, skipped=1, rejected=1, completed=5)
    assert_redis_mirrors_ledger(store, counters, run_id)


def test_a_final_attempt_error_before_any_ack_fails_the_pages_pending_jobs(
    store: Ledger, redis_url: str
) -> None:
    run_id, counters = setup(store, redis_url)

    def handler(batch: JobBatch) -> None:
        if "d" in batch.keys:
            raise ValueError("refused")

    with pytest.raises(HandlerError):
        process_pages(flow_with(handler), run_id, PAGES, counters, store, final_attempt=True)

    pages = store.page_counts(run_id)
    assert pages[2] == Counts(source=2, dispatched=2, failed=2)
    assert [(f.record_key, f.error) for f in store.job_failures(run_id)] == [
        ("d", "ValueError: refused"),
        ("e", "ValueError: refused"),
    ]
    assert_redis_mirrors_ledger(store, counters, run_id)


def test_a_crash_inside_a_handler_leaves_the_whole_step_pending(
    store: Ledger, redis_url: str
) -> None:
    run_id, counters = setup(store, redis_url)

    with pytest.raises(Crash):
        process_pages(flow_with(failing_on(0, Crash())), run_id, PAGES, counters, store)

    assert store.page_counts(run_id) == DISPATCHED
    assert store.page_totals([run_id])[run_id].pages_done == 0
    assert_redis_mirrors_ledger(store, counters, run_id)
