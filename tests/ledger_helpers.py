"""Shorthands the tests use on the ledger and the page step; production code calls the
batched forms."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from flow_assets.flow import Flow
from flow_assets.page_step import process_pages
from flow_assets.sources.base import Page
from resources.counts import Counts
from resources.ledger import db, flow_key_queries
from resources.ledger.ledger import Ledger
from resources.ledger.records import FinalState, PageRecord
from resources.live.counters import LiveCounters


def finish_page(store: Ledger, run_id: str, page: PageRecord) -> None:
    """``finish_pages`` for one page."""
    store.finish_pages(run_id, [page])


def finalize(
    store: Ledger,
    run_id: str,
    *,
    status: str,
    counts: Counts,
    pages_done: int,
    finished_at: datetime,
    failure_reason: str | None = None,
    counter_mismatch: str | None = None,
    runtime_ms: int | None = None,
) -> bool:
    """``finalize_many`` for one run: True only for the winner."""
    final = FinalState(
        run_id,
        status,
        counts,
        pages_done,
        finished_at,
        failure_reason,
        counter_mismatch,
        runtime_ms,
    )
    return store.finalize_many([final]) == [run_id]


def release_failed_keys(store: Ledger, run_ids: Sequence[str]) -> int:
    """Release the failed jobs' keys of final ``dedup="flow"`` runs (what the final write
    does in its own transaction); how many."""
    if not run_ids:
        return 0
    with db.transaction(store.engine(), write=True, retry_seconds=0) as conn:
        return flow_key_queries.release_failed_keys(conn, run_ids)


def process_page(
    flow: Flow,
    run_id: str,
    page: Page,
    counters: LiveCounters,
    store: Ledger,
    *,
    final_attempt: bool = False,
) -> Counts:
    """``process_pages`` for one page: its counts as recorded in the ledger."""
    return process_pages(flow, run_id, [page], counters, store, final_attempt=final_attempt)
