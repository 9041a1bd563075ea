"""One page through the hot path: validate, dedup, dispatch, and record its outcome once.

A step's pages share their ledger transactions and Redis round trips (``process_pages``).
Idempotent by construction: the page's ledger row, rejects and failures are *replaced* on
every attempt, and the Redis dedup claim is owned by the page index, so a retried page
re-claims its own keys instead of seeing them as duplicates. With ``dedup="flow"`` the keys
Redis gave the page are then claimed in the flow's durable key table, against other runs.

Redis is the fast path, the ledger decides (``resources.flow_run.FlowRun`` owns that rule):
only the keys the ledger gave a page reach its handler (or its RQ jobs), each key at most
once per run, even if Redis lost the run between a page's claim and its pre-write.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import dagster as dg

from flow_assets.dispatch import JobBatch, error_text, handler_error_text
from flow_assets.errors import HandlerError
from flow_assets.flow import Flow
from flow_assets.rq.dispatch import enqueue_jobs, plan_jobs
from flow_assets.sources.base import Page
from flow_assets.validation import validate_records
from resources.counts import Counts
from resources.flow_run import LOST_MID_RUN, FlowRun
from resources.ledger.ledger import Ledger
from resources.ledger.records import JobFailure, PageRecord, RejectedRecord
from resources.live.counters import LiveCounters

__all__ = ["LOST_MID_RUN", "process_pages"]


@dataclass(frozen=True)
class _ClaimedPage:
    """A page after validation and dedup: the jobs it owns, before its handler runs."""

    index: int
    counts: Counts
    keys: list[str]
    records: list[Mapping[str, Any]]
    rejects: list[RejectedRecord]


def process_pages(
    flow: Flow,
    run_id: str,
    pages: Sequence[Page],
    counters: LiveCounters,
    store: Ledger,
    *,
    final_attempt: bool = False,
) -> Counts:
    """Process a step's pages, in order; their summed counts as recorded in the ledger.

    Each page is validated and claimed in Redis (one Lua call); then all of them are
    pre-written to the ledger in one transaction and mirrored in Redis in one round trip,
    the handler runs page by page, and their outcomes go to the ledger in one transaction
    and to Redis in one round trip. A handler error on a page: the pages finished before it
    are recorded and, unless this is the ``final_attempt``, the step fails at once (its
    retry replaces every page). On the final attempt the page's unfinished jobs are failed
    with the error, the remaining pages still run, and the step fails at the end.
    """
    run = FlowRun(flow.name, run_id, store, counters)
    claimed = [_claim_page(flow, run, page) for page in pages]
    if flow.rq is not None:
        return sum((_dispatch_to_workers(flow, run, page) for page in claimed), Counts())
    # Written before the handler runs, to the ledger and then to Redis (its mirror), so
    # that a crash mid-step leaves its jobs visible as pending (counted as lost if the run
    # then fails) instead of invisible.
    pending = [PageRecord(p.index, p.counts, "dispatched", p.keys, p.rejects) for p in claimed]
    recorded = run.prewrite(pending)
    claimed = _owned_by_ledger(run, claimed, recorded)
    run.mirror(recorded)

    done: list[PageRecord] = []
    first_error: HandlerError | None = None
    for page in claimed:
        outcome, error = _run_handler(flow, page, final_attempt)
        if outcome is None:
            assert error is not None  # only a raising handler leaves a page unfinished
            run.finish(done)
            raise error from None  # Dagster retries the step; the retry replaces its pages
        done.append(outcome)
        first_error = first_error or error
    run.finish(done)
    if first_error is not None:
        # The last attempt: unfinished jobs are failed, the error kept; the step fails.
        raise first_error from None
    return sum((page.counts for page in done), Counts())


def _claim_page(flow: Flow, run: FlowRun, page: Page) -> _ClaimedPage:
    """Validate a page and claim its record keys: the jobs it owns (the rest skipped)."""
    valid = validate_records(page.records, flow.key, flow.max_record_bytes)
    owned = run.claim_page(page.index, valid.keys)
    if flow.dedup == "flow":
        owned = run.claim_in_flow(page.index, valid.keys, owned)
    keys = [key for key, mine in zip(valid.keys, owned, strict=True) if mine]
    records = [record for record, mine in zip(valid.records, owned, strict=True) if mine]
    counts = Counts(
        source=len(page.records),
        dispatched=len(keys),
        skipped=len(valid.keys) - len(keys),
        rejected=len(valid.rejects),
    )
    return _ClaimedPage(page.index, counts, keys, records, valid.rejects)


def _owned_by_ledger(
    run: FlowRun, claimed: list[_ClaimedPage], recorded: Sequence[PageRecord]
) -> list[_ClaimedPage]:
    """The claimed pages narrowed to the keys the ledger gave them (see ``record_pages``).

    Keys Redis gave a page but the ledger gave another are skipped; Redis was wrong about
    them (it lost the run meanwhile), so its claims are realigned with the ledger.
    """
    by_index = {page.page_index: page for page in recorded}
    owned = [_narrow(page, by_index[page.index]) for page in claimed]
    if any(mine is not page for mine, page in zip(owned, claimed, strict=True)):
        run.realign()
    return owned


def _narrow(page: _ClaimedPage, recorded: PageRecord) -> _ClaimedPage:
    if len(recorded.claimed_keys) == len(page.keys):
        return page  # the hot path: the ledger agreed with Redis
    mine = set(recorded.claimed_keys)
    kept = [pair for pair in zip(page.keys, page.records, strict=True) if pair[0] in mine]
    return replace(
        page,
        counts=recorded.counts,
        keys=[key for key, _ in kept],
        records=[record for _, record in kept],
    )


def _run_handler(
    flow: Flow, page: _ClaimedPage, final_attempt: bool
) -> tuple[PageRecord | None, HandlerError | None]:
    """Run the handler on a page: its outcome, and the handler's error if it raised.

    The outcome is None when the handler raised and the step will be retried.
    """
    batch = JobBatch(page.keys, page.records)
    error: HandlerError | None = None
    try:
        if page.keys:
            flow.handler(batch)
    except (dg.Failure, dg.RetryRequested):
        raise  # the handler's own instructions to Dagster
    except Exception as exc:
        error = _handler_error(flow, page.index, exc)
        if not final_attempt:
            return None, error
        batch.fail_pending(error_text(exc))
    completed, failed = batch.finish()
    counts = replace(page.counts, completed=completed, failed=failed)
    failures = [JobFailure(key, message) for key, message in batch.failures.items()]
    return PageRecord(page.index, counts, "done", page.keys, page.rejects, failures), error


def _handler_error(flow: Flow, page_index: int, exc: Exception) -> HandlerError:
    """The handler's exception as ours, never chained: its class and message, secrets
    redacted and personal data masked unless the flow asks for ``error_detail="full"``
    (the failed jobs' rows keep the whole message either way)."""
    return HandlerError(handler_error_text(flow.name, page_index, exc, flow.error_detail))


def _dispatch_to_workers(flow: Flow, run: FlowRun, page: _ClaimedPage) -> Counts:
    """dispatch="rq": ledger first (page and pending jobs), then Redis, then the queue, so
    that every ack finds its job and page; returns the page's counts at dispatch."""
    assert flow.rq is not None and flow.queue_name and flow.handler_path
    job_ids = plan_jobs(flow.name, run.run_id, page.index, page.keys, flow.rq.batch_size)
    status = "dispatched" if page.keys else "done"
    record = PageRecord(page.index, page.counts, status, page.keys, page.rejects)
    recorded, pending = run.dispatch_page(record, job_ids)
    [page] = _owned_by_ledger(run, [page], [recorded])
    run.mirror_dispatched(page.index, page.counts)
    counters = run.counters
    enqueue_jobs(
        counters.rq_connection(),
        flow.rq,
        queue=flow.queue_name,
        handler=flow.handler_path,
        flow=flow.name,
        run_id=run.run_id,
        page_index=page.index,
        records=dict(zip(page.keys, page.records, strict=True)),
        job_ids={key: job_ids[key] for key in page.keys},
        pending=pending,
        key_ttl_seconds=counters.key_ttl_seconds,
    )
    return page.counts
