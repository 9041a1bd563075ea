"""At most once per key, whatever Redis loses: FLUSHALL between the Redis claims of two pages
of a step, and between a step's claims and its ledger pre-write while another step runs, on a
real Redis and a real PostgreSQL or SQLite ledger, through the real ``process_pages`` and the
real finalizer (an ephemeral Dagster instance).

What is wrapped, and why: ``LiveCounters.claim_page``, by ``FlushAfterClaim``, which runs a
fault right after the Nth claim of one step returns. A step claims its pages one after the
other and pre-writes them all afterwards (``process_pages``), so that is the only place to
put a fault between two claims, or between the last claim and the pre-write, without
threads. The fault is a real FLUSHALL, sometimes followed by another step run to completion
(the interleaving of two steps of a run). The handler is the test's own: it records every key
it is given. With dispatch="rq" the page step's call to ``enqueue_jobs`` is wrapped to record
the keys handed to the queue (then enqueued for real; no worker runs them). Nothing else is
faked.

A ``dedup="run"`` run claims keys in the ledger from its first loss of Redis on; a
``dedup="flow"`` run from its first page: both are covered.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from typing import Any, cast

import dagster as dg
import pytest

from flow_assets import page_step
from flow_assets.dispatch import JobBatch
from flow_assets.errors import HandlerError
from flow_assets.flow import Flow
from flow_assets.page_step import LOST_MID_RUN, process_pages
from flow_assets.sources.base import Page
from resources.counts import Counts
from resources.ledger.ledger import Ledger
from resources.live.counters import LiveCounters
from sensors.finalizer import FlowPolicy, finalize_runs
from tests.dagster import rq_flows
from tests.flowkit import NoSource

FLOW = "claims_flow"
PAGE_SIZE = 250
UNIQUE, DUPLICATES = 3700, 300


def ids(first: int, count: int) -> list[str]:
    return [f"u{n}" for n in range(first, first + count)]


def build_pages() -> list[list[str]]:
    """16 pages of 250 ids, 4000 in all, of which 300 repeat an id of an earlier page.

    Steps are pages 0-3, 4-7, 8-11 and 12-15. The repeats are placed where Redis, having
    lost the run, gives them to a second page: pages 1 and 3 repeat page 0 (claimed just
    before the first FLUSHALL); page 8 repeats page 5 (claimed by the step that the second
    FLUSHALL catches before its pre-write); page 12 repeats page 4 (the same step's claims,
    which the rebuild that followed the second FLUSHALL could not know). Page 9 repeats page
    0 once its step is in the ledger: Redis, rebuilt from the ledger, skips those itself.
    """
    fresh = iter(ids(0, UNIQUE))

    def unique(count: int) -> list[str]:
        return [next(fresh) for _ in range(count)]

    pages: list[list[str]] = [unique(250)]
    pages.append(unique(200) + pages[0][:50])
    pages.append(unique(250))
    pages.append(unique(200) + pages[0][50:100])
    pages += [unique(250) for _ in range(4)]  # 4-7
    pages.append(unique(150) + pages[5][:100])  # 8
    pages.append(unique(200) + pages[0][100:150])  # 9
    pages += [unique(250), unique(250)]  # 10, 11
    pages.append(unique(200) + pages[4][:50])  # 12
    pages += [unique(250) for _ in range(3)]  # 13-15
    assert next(fresh, None) is None
    return pages


class FlushAfterClaim:
    """``LiveCounters`` as ``process_pages`` uses it; after the Nth ``claim_page`` call
    returns (N counted from 1, a repeat after a rebuild included), its fault runs."""

    def __init__(self, counters: LiveCounters, faults: dict[int, Callable[[], object]]) -> None:
        self._counters, self._faults, self.calls = counters, faults, 0

    def claim_page(self, *args: Any, **kwargs: Any) -> list[bool] | None:
        owned = self._counters.claim_page(*args, **kwargs)
        self.calls += 1
        if fault := self._faults.pop(self.calls, None):
            fault()
        return owned

    def __getattr__(self, name: str) -> Any:
        return getattr(self._counters, name)


def run_the_faulty_steps(
    flow: Flow, run_id: str, pages: Sequence[Page], counters: LiveCounters, store: Ledger
) -> None:
    """The run's four steps, FLUSHALL between the claims of pages 0 and 1, and between the
    claims and the pre-write of pages 4-7 while the step of pages 8-11 runs whole."""
    flush = counters.client().flushall

    def step(chunk: Sequence[Page], faults: dict[int, Callable[[], object]]) -> None:
        hooked = FlushAfterClaim(counters, faults)
        process_pages(flow, run_id, chunk, cast(LiveCounters, hooked), store)
        assert not faults, f"faults never ran: {sorted(faults)}"

    def second_fault() -> None:
        flush()
        step(pages[8:12], {})  # another step, start to finish, while 4-7 wait for the ledger

    step(pages[0:4], {1: flush})  # between the claims of pages 0 and 1
    step(pages[4:8], {4: second_fault})  # after the last claim, before the pre-write
    step(pages[12:16], {})


def build_page_objects() -> list[Page]:
    return [
        Page(index, [{"id": key, "page": index} for key in keys])
        for index, keys in enumerate(build_pages())
    ]


@pytest.fixture
def ephemeral_instance() -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.ephemeral() as instance:
        yield instance


@pytest.mark.parametrize("dedup", ["run", "flow"])
def test_no_key_reaches_the_handler_twice_when_redis_is_flushed_mid_step(
    dedup: str, redis_url: str, database_url: str, ephemeral_instance: dg.DagsterInstance
) -> None:
    store, counters = Ledger(url=database_url), LiveCounters(url=redis_url)
    handled: Counter[str] = Counter()

    def handler(batch: JobBatch) -> None:
        handled.update(batch.keys)

    flow = Flow(name=FLOW, source=NoSource(), key="id", handler=handler, dedup=dedup)  # type: ignore[arg-type]
    run_id = f"claims-{dedup}-{store.engine().dialect.name}"
    store.start_run(run_id, FLOW, None, datetime.now(timezone.utc), flow.run_policy())
    counters.start_run(FLOW, run_id)
    pages = build_page_objects()
    run_the_faulty_steps(flow, run_id, pages, counters, store)

    assert max(handled.values()) == 1, [key for key, n in handled.items() if n > 1][:10]
    assert sorted(handled) == sorted(ids(0, UNIQUE))
    truth = Counts(
        source=UNIQUE + DUPLICATES,
        dispatched=UNIQUE,
        skipped=DUPLICATES,
        completed=UNIQUE,
    )
    assert store.page_totals([run_id])[run_id].counts == truth
    assert counters.totals(FLOW, run_id) == truth  # Redis realigned, then mirrored
    assert len(store.claimed_keys(run_id)) == UNIQUE

    store.record_plan(run_id, len(pages), None)  # as the plan and collect ops do
    store.mark_extraction_done(run_id)
    ephemeral_instance.add_run(
        dg.DagsterRun(job_name=f"{FLOW}_job", run_id=run_id, status=dg.DagsterRunStatus.SUCCESS)
    )
    report = finalize_runs(ephemeral_instance, store, counters, {FLOW: FlowPolicy()})
    assert report.finalized == {run_id: "partial_success"}, report
    [row] = store.runs(run_id=run_id)
    assert (row.flow_status, row.counts, row.pages_done) == ("partial_success", truth, 16)
    assert row.counter_mismatch is not None and LOST_MID_RUN in row.counter_mismatch


def test_no_key_is_enqueued_for_two_pages_when_redis_is_flushed_mid_step(
    redis_url: str, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dispatch="rq": the same faults; each key goes to the queue for one page only."""
    store, counters = Ledger(url=database_url), LiveCounters(url=redis_url)
    enqueued: Counter[str] = Counter()
    enqueue = page_step.enqueue_jobs

    def recording_enqueue(*args: Any, **kwargs: Any) -> int:
        enqueued.update(list(kwargs["records"]))  # the keys of this page's jobs
        assert set(kwargs["job_ids"]) == set(kwargs["records"])
        return enqueue(*args, **kwargs)

    monkeypatch.setattr(page_step, "enqueue_jobs", recording_enqueue)
    flow = Flow(name=FLOW, source=NoSource(), key="id", handler=rq_flows.handle, dispatch="rq")
    run_id = f"rq-{store.engine().dialect.name}"
    store.start_run(run_id, FLOW, None, datetime.now(timezone.utc), flow.run_policy())
    counters.start_run(FLOW, run_id)

    run_the_faulty_steps(flow, run_id, build_page_objects(), counters, store)

    assert max(enqueued.values()) == 1, [key for key, n in enqueued.items() if n > 1][:10]
    assert sorted(enqueued) == sorted(ids(0, UNIQUE))
    truth = Counts(source=UNIQUE + DUPLICATES, dispatched=UNIQUE, skipped=DUPLICATES)
    assert store.page_totals([run_id])[run_id].counts == truth  # jobs pending on the queue
    assert len(store.claimed_keys(run_id)) == UNIQUE


def test_a_retry_of_the_ledger_owner_dispatches_its_keys_again(
    redis_url: str, database_url: str
) -> None:
    """Redis gave key k to pages 0 and 1 after losing the run; the ledger gave it to page 0.
    Redis is realigned with the ledger, so page 0's retry (its handler crashed) owns k again
    in Redis and dispatches it, and page 1's retry still skips it."""
    store, counters = Ledger(url=database_url), LiveCounters(url=redis_url)
    crash = {"on": True}
    handled: list[list[str]] = []

    def handler(batch: JobBatch) -> None:
        handled.append(list(batch.keys))
        if crash["on"] and "k" in batch.keys:
            raise ConnectionError("downstream went away")

    flow = Flow(name=FLOW, source=NoSource(), key="id", handler=handler)
    run_id = f"retry-{store.engine().dialect.name}"
    store.start_run(run_id, FLOW, None, datetime.now(timezone.utc), flow.run_policy())
    counters.start_run(FLOW, run_id)
    page0, page1 = Page(0, [{"id": "k"}, {"id": "a"}]), Page(1, [{"id": "k"}, {"id": "b"}])
    hooked = FlushAfterClaim(counters, {1: counters.client().flushall})

    # Both pages in one step: the flush comes between their claims; page 0 crashes.
    with pytest.raises(HandlerError, match="downstream went away"):
        process_pages(flow, run_id, [page0, page1], cast(LiveCounters, hooked), store)
    crash["on"] = False
    process_pages(flow, run_id, [page0, page1], counters, store)

    assert handled == [["k", "a"], ["k", "a"], ["b"]]
    totals = store.page_totals([run_id])[run_id]
    assert totals.counts == Counts(source=4, dispatched=3, skipped=1, completed=3)
    assert store.claimed_keys(run_id) == {"k": 0, "a": 0, "b": 1}
    assert counters.totals(FLOW, run_id) == totals.counts
