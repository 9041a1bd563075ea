"""dedup="flow" key claims on real SQLite files and a real PostgreSQL server, and the real
page step on a real Redis; nothing is faked (the handler and the in-memory pages are the test's)."""

from __future__ import annotations

import random
import threading
import uuid
from datetime import datetime, timezone

import pytest
from sqlalchemy import select

from flow_assets.dispatch import JobBatch
from flow_assets.errors import FlowDefinitionError, HandlerError
from flow_assets.flow import Flow
from flow_assets.sources.base import Page
from resources.counts import Counts
from resources.ledger.ledger import Ledger
from resources.ledger.schema import flow_dispatched_keys
from resources.live.counters import LiveCounters
from tests.flowkit import NoSource
from tests.ledger_helpers import process_page

FLOW = "orders"


def owners(store: Ledger, flow: str = FLOW) -> dict[str, tuple[str, int]]:
    table = flow_dispatched_keys
    stmt = select(table.c.record_key, table.c.run_id, table.c.page_index).where(
        table.c.flow_name == flow
    )
    with store.engine().connect() as conn:
        return {key: (run_id, page) for key, run_id, page in conn.execute(stmt)}


def test_new_keys_are_claimed_and_stay_their_runs(store: Ledger) -> None:
    assert store.claim_flow_keys(FLOW, "run-a", 0, ["a", "b", "c"]) == [True, True, True]

    # The same page again (a retry) owns them still; a new key joins.
    assert store.claim_flow_keys(FLOW, "run-a", 0, ["c", "a", "d"]) == [True, True, True]
    # Another page of the same run (the run's own key table decides between its pages,
    # at the pre-write), another run, and another flow.
    assert store.claim_flow_keys(FLOW, "run-a", 1, ["a", "e"]) == [True, True]
    assert store.claim_flow_keys(FLOW, "run-b", 0, ["b", "e", "f"]) == [False, False, True]
    assert store.claim_flow_keys("other_flow", "run-b", 0, ["a"]) == [True]

    assert owners(store) == {
        "a": ("run-a", 0),
        "b": ("run-a", 0),
        "c": ("run-a", 0),
        "d": ("run-a", 0),
        "e": ("run-a", 1),
        "f": ("run-b", 0),
    }


def test_a_key_repeated_in_one_call_counts_at_its_first_place(store: Ledger) -> None:
    assert store.claim_flow_keys(FLOW, "run-a", 0, ["a", "a", "b"]) == [True, False, True]
    assert store.claim_flow_keys(FLOW, "run-a", 0, []) == []


def test_a_page_larger_than_one_insert_batch(store: Ledger) -> None:
    keys = [f"k{i:05d}" for i in range(12_000)]
    assert store.claim_flow_keys(FLOW, "run-a", 0, keys[:7000]) == [True] * 7000
    flags = store.claim_flow_keys(FLOW, "run-b", 3, keys)
    assert flags == [False] * 7000 + [True] * 5000
    assert len(owners(store)) == 12_000


def test_concurrent_runs_each_key_is_owned_exactly_once(store: Ledger) -> None:
    """Four runs claim the same 300 keys at once, in different orders and page splits."""
    store.claim_flow_keys(FLOW, "warm-up", 0, ["w"])  # migrate before the race
    keys = [f"k{i:03d}" for i in range(300)]
    runs = [f"run-{n}" for n in range(4)]
    barrier = threading.Barrier(len(runs))
    won: dict[str, list[tuple[int, str]]] = {run: [] for run in runs}
    errors: list[BaseException] = []

    def claim(run_index: int) -> None:
        run = runs[run_index]
        mine = list(keys)
        random.Random(run_index).shuffle(mine)
        size = 30 + 7 * run_index
        pages = [mine[start : start + size] for start in range(0, len(mine), size)]
        barrier.wait()
        try:
            for page_index, page in enumerate(pages):
                flags = store.claim_flow_keys(FLOW, run, page_index, page)
                won[run].extend((page_index, k) for k, f in zip(page, flags, strict=True) if f)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(len(runs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)  # a hang guard, not a timing assertion
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []

    claimed = [key for run in runs for _, key in won[run]]
    assert sorted(claimed) == keys  # every key once, no key twice
    table = owners(store)
    for run in runs:
        for page_index, key in won[run]:
            assert table[key] == (run, page_index)


def page_of(index: int, ids: list[object]) -> Page:
    return Page(index, [{"id": i} for i in ids])


def test_the_page_step_skips_keys_of_other_runs_and_keeps_its_own(
    store: Ledger, redis_url: str
) -> None:
    counters = LiveCounters(url=redis_url)
    attempts: list[list[str]] = []

    def handler(batch: JobBatch) -> None:
        attempts.append(list(batch.keys))
        if len(attempts) == 2:
            batch.fail(batch.keys[0], "downstream said no")
            raise ConnectionError("crash after the first job (first attempt of run-b)")

    flow = Flow(name=FLOW, source=NoSource(), key="id", handler=handler, dedup="flow")
    first, second = f"run-{uuid.uuid4().hex[:8]}", f"run-{uuid.uuid4().hex[:8]}"
    for run in (first, second):
        store.start_run(run, FLOW, None, datetime.now(timezone.utc))
        counters.start_run(FLOW, run)

    got = process_page(flow, first, page_of(0, [1, 2, 3, 2]), counters, store)
    assert got == Counts(source=4, dispatched=3, skipped=1, completed=3)

    # run-b overlaps on 2 and 3; its first attempt crashes, the retry counts once.
    with pytest.raises(HandlerError, match="ConnectionError: crash after the first job"):
        process_page(flow, second, page_of(0, [2, 3, 4, 5, "x" * 600]), counters, store)
    got = process_page(flow, second, page_of(0, [2, 3, 4, 5, "x" * 600]), counters, store)
    assert got == Counts(source=5, dispatched=2, skipped=2, rejected=1, completed=2)
    assert attempts == [["1", "2", "3"], ["4", "5"], ["4", "5"]]
    assert store.page_totals([second])[second].counts == got
    assert counters.totals(FLOW, second) == got
    assert store.claimed_keys(second) == {"4": 0, "5": 0}


@pytest.mark.parametrize("scope", ["global", "", None, "FLOW"])
def test_an_unknown_dedup_scope_is_refused_naming_the_valid_ones(scope: object) -> None:
    with pytest.raises(FlowDefinitionError, match=r"dedup=.*expected 'run' or 'flow'"):
        Flow(name=FLOW, source=NoSource(), key="id", handler=print, dedup=scope)  # type: ignore[arg-type]
