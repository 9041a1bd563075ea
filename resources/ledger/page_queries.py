"""SQL of a run's pages: the pre-write and the final write of a step's pages (with their
rejected records and failed jobs), and reading them back. One function per operation, each
given an open transaction; all SQL parameterized."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import cache, lru_cache

from sqlalchemy import (
    Connection,
    Insert,
    Table,
    and_,
    bindparam,
    case,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from resources.batching import IN_LIST_SIZE, batched
from resources.counts import Counts
from resources.errors import RunFinalError
from resources.ledger import job_queries, run_key_queries
from resources.ledger.records import (
    PageRecord,
    PageTotals,
    StoredFailure,
    StoredReject,
)
from resources.ledger.schema import (
    PAGE_COUNT_COLUMNS,
    flow_job_failures,
    flow_metrics,
    flow_page_progress,
    flow_rejected_records,
)
from resources.redaction import escape_unstorable
from resources.run_policy import RunPolicy

MAX_RAW_RECORD_BYTES = 64 * 1024


MAX_ERROR_BYTES = 8 * 1024


_fm, _pages = flow_metrics, flow_page_progress


_rejects, _failures = flow_rejected_records, flow_job_failures


def truncate_text(value: str, max_bytes: int) -> str:
    """``value`` cut to ``max_bytes`` of UTF-8, with a marker saying how much was cut."""
    # PostgreSQL text cannot hold NUL, UTF-8 no lone surrogate: escape, never lose the record.
    value = escape_unstorable(value)
    data = value.encode("utf-8")
    if len(data) <= max_bytes:
        return value
    marker = f"...[truncated {len(data)} bytes to {max_bytes}]"
    head = data[: max_bytes - len(marker.encode("utf-8"))].decode("utf-8", errors="ignore")
    return head + marker


def _raw_text(raw: object) -> str:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, bytes):
        return raw.decode("utf-8", errors="replace")
    return json.dumps(raw, default=str, ensure_ascii=False)


@cache  # statements are immutable; building `excluded` costs more than executing
def _upsert(
    dialect_name: str, table: Table, keys: tuple[str, ...], columns: tuple[str, ...]
) -> Insert:
    stmt = (postgresql if dialect_name == "postgresql" else sqlite).insert(table)
    return stmt.on_conflict_do_update(
        index_elements=list(keys), set_={name: stmt.excluded[name] for name in columns}
    )


def _upsert_failures(
    conn: Connection, run_id: str, pages: Sequence[PageRecord], now: datetime
) -> None:
    """Write the job failures of pages, one row per record key (the last page's wins)."""
    rows = {
        failure.record_key: {
            "run_id": run_id,
            "record_key": failure.record_key,
            "page_index": page.page_index,
            "error": truncate_text(failure.error, MAX_ERROR_BYTES),
            "created_at": now,
        }
        for page in pages
        for failure in page.failures
    }
    if rows:
        # Upsert: a key failed earlier on another page (a bug elsewhere) must not abort the page.
        columns = ("page_index", "error", "created_at")
        stmt = _upsert(conn.dialect.name, _failures, ("run_id", "record_key"), columns)
        conn.execute(stmt, list(rows.values()))


def replace_pages(
    conn: Connection, run_id: str, pages: Sequence[PageRecord], now: datetime
) -> list[PageRecord] | None:
    """Upsert page rows and replace their rejects and failures; the pages as recorded, one
    per index, in the order given (None: the run has no row).

    Redis is the fast path: while it has held the run whole since the run started, no two
    pages were given the same key, and a page is recorded as given. Once Redis lost the run
    (``flow_metrics.counter_mismatch`` noted, before any rebuild reads the ledger), a rebuild
    cannot know the claims of pages not yet recorded, so two pages may both have been given
    a key: from then on every page's keys are claimed in ``flow_run_keys`` here, and a key
    another page of the run owns is taken out of the page, counted skipped
    (``PageRecord.without_keys``). A ``dedup="flow"`` run, which claims every key in the
    ledger anyway, claims them there from its first page (its failed keys are released
    from that table, ``flow_key_queries``). So does a reopened run (``revision > 0``):
    its steps restore the Redis state its finalization removed without a note, and cannot
    tell that from a later loss.

    The run row is updated last, as the fast path always did (its lock held the shortest
    time); that update also reads the note. A note written concurrently waits for this
    transaction, so this page is either recorded before the note (and the rebuild that
    follows it reads it) or sees the note and claims its keys in the ledger.
    """
    # Last attempt wins within a call too; sorted so concurrent writers lock in one order.
    latest = {page.page_index: page for page in pages}
    ordered = [latest[index] for index in sorted(latest)]
    _upsert_page_rows(conn, run_id, ordered, now)

    _replace_rejects_and_failures(conn, run_id, ordered, now)
    # Last, so the run row's lock is held for the shortest time.
    stmt = (
        update(_fm)
        .where(_fm.c.run_id == run_id)
        .values(updated_at=now)
        .returning(
            _fm.c.flow_status,
            _fm.c.awaiting_dagster,
            _fm.c.counter_mismatch,
            _fm.c.run_policy,
            _fm.c.revision,
        )
    )
    run = conn.execute(stmt).first()
    if run is None:
        return None
    check_still_recording(run_id, run.flow_status, run.awaiting_dagster)
    # A step still writing to a run already final (declared stalled) works on Redis state
    # its finalization removed, and a loss is noted on running runs only: the ledger decides.
    if (
        run.counter_mismatch is not None
        or run.revision > 0
        or run.flow_status != "running"
        or _dedup_of(run.run_policy) == "flow"
    ):
        claims = {index: page.claimed_keys for index, page in latest.items()}
        lost = run_key_queries.claim_run_keys(conn, run_id, claims)
        for index, owners in lost.items():
            latest[index] = latest[index].without_keys(owners)
        _upsert_page_rows(conn, run_id, [latest[index] for index in sorted(lost)], now)
    return list(latest.values())


def _replace_rejects_and_failures(
    conn: Connection, run_id: str, pages: Sequence[PageRecord], now: datetime
) -> None:
    """Replace the pages' quarantined records and failed jobs with these attempts' own."""
    for chunk in batched([page.page_index for page in pages], IN_LIST_SIZE):
        conn.execute(
            delete(_rejects).where(_rejects.c.run_id == run_id, _rejects.c.page_index.in_(chunk))
        )
        conn.execute(
            delete(_failures).where(_failures.c.run_id == run_id, _failures.c.page_index.in_(chunk))
        )
    reject_rows = {
        (page.page_index, reject.position): {
            "run_id": run_id,
            "page_index": page.page_index,
            "position": reject.position,
            "reason": truncate_text(reject.reason, MAX_ERROR_BYTES),
            "raw_record": truncate_text(_raw_text(reject.raw), MAX_RAW_RECORD_BYTES),
            "created_at": now,
        }
        for page in pages
        for reject in page.rejects
    }
    if reject_rows:
        conn.execute(_rejects.insert(), list(reject_rows.values()))
    _upsert_failures(conn, run_id, pages, now)


@lru_cache(maxsize=64)
def _dedup_of(policy: str | None) -> str | None:
    return RunPolicy.from_json(policy).dedup if policy else None


def _upsert_page_rows(
    conn: Connection, run_id: str, pages: Sequence[PageRecord], now: datetime
) -> None:
    if not pages:
        return
    page_rows = [
        {
            "run_id": run_id,
            "page_index": page.page_index,
            "status": page.status,
            **dict(zip(PAGE_COUNT_COLUMNS, page.counts.as_tuple(), strict=True)),
            "claimed_keys": json.dumps(list(page.claimed_keys), separators=(",", ":")),
            "updated_at": now,
        }
        for page in pages
    ]
    updated = ("status", *PAGE_COUNT_COLUMNS, "claimed_keys", "updated_at")
    stmt = _upsert(conn.dialect.name, _pages, ("run_id", "page_index"), updated)
    conn.execute(stmt, page_rows)


def finish_pages(
    conn: Connection, run_id: str, pages: Sequence[PageRecord], now: datetime
) -> list[int]:
    """Record the outcomes of pages ``replace_pages`` wrote in this attempt (same keys and
    rejects; their old failures already deleted): counts, status and failures only, so the
    hot path does not send the pages' claimed keys twice. One executemany for the rows.

    Returns:
        The indexes of the pages that have no row (nothing is written if there is one).
    """
    latest = {page.page_index: page for page in pages}
    stmt = select(_pages.c.page_index).where(
        _pages.c.run_id == run_id, _pages.c.page_index.in_(list(latest))
    )
    missing = set(latest) - set(conn.execute(stmt).scalars())
    if missing:
        return sorted(missing)
    rows = [
        {
            "b_page_index": page.page_index,
            "b_status": page.status,
            **{
                f"b_{name}": n
                for name, n in zip(PAGE_COUNT_COLUMNS, page.counts.as_tuple(), strict=True)
            },
            "b_updated_at": now,
            "b_run_id": run_id,
        }
        for page in latest.values()
    ]
    conn.execute(_FINISH_PAGE, rows)
    _upsert_failures(conn, run_id, list(latest.values()), now)
    touch = (
        update(_fm)
        .where(_fm.c.run_id == run_id)
        .values(updated_at=now)
        .returning(_fm.c.flow_status, _fm.c.awaiting_dagster)
    )
    if (run := conn.execute(touch).first()) is not None:
        check_still_recording(run_id, run.flow_status, run.awaiting_dagster)
    return []


def check_still_recording(run_id: str, flow_status: str, awaiting_dagster: bool) -> None:
    """Pages are recorded while the run is running, or final but decided while its Dagster
    run still worked (stalled: decided again once it ends). Otherwise the final row stands
    and agrees with the ledger: raising rolls the step's write back."""
    if flow_status != "running" and not awaiting_dagster:
        raise RunFinalError(run_id, flow_status)


_FINISH_PAGE = (
    update(_pages)
    .where(
        _pages.c.run_id == bindparam("b_run_id"), _pages.c.page_index == bindparam("b_page_index")
    )
    .values(
        {name: bindparam(f"b_{name}") for name in ("status", *PAGE_COUNT_COLUMNS, "updated_at")}
    )
)


def missing_pages(conn: Connection, run_id: str) -> list[int] | None:
    """Planned pages of the run with no row in the ledger; None if no plan is recorded."""
    pages_total = conn.execute(
        select(_fm.c.pages_total).where(_fm.c.run_id == run_id)
    ).scalar_one_or_none()
    if pages_total is None:
        return None
    seen = set(conn.execute(select(_pages.c.page_index).where(_pages.c.run_id == run_id)).scalars())
    return [index for index in range(pages_total) if index not in seen]


def page_totals(conn: Connection, run_ids: Sequence[str]) -> dict[str, PageTotals]:
    """Sum each run's page rows, plus its async job outcomes, in one query per chunk of runs.

    A page dispatched to workers (dispatch="rq") keeps the counts it had at dispatch; its
    jobs' outcomes are in ``flow_async_jobs`` and added here. Such a page is done when
    none of its jobs is pending.
    """
    totals = {run_id: PageTotals(Counts(), 0, 0) for run_id in run_ids}
    for chunk in batched(list(dict.fromkeys(run_ids)), IN_LIST_SIZE):
        pages = job_queries.pages_with_outcomes(chunk)
        settled = or_(
            pages.c.status == "done",
            and_(
                pages.c.has_jobs.is_not(None),
                pages.c.dispatched == pages.c.completed + pages.c.failed,
            ),
        )
        stmt = select(
            pages.c.run_id,
            *(func.sum(pages.c[name]) for name in PAGE_COUNT_COLUMNS),
            func.sum(case((settled, 1), else_=0)),
            func.count(),
        ).group_by(pages.c.run_id)
        for run_id, *values in conn.execute(stmt):
            *counts, pages_done, pages_seen = (int(value) for value in values)
            totals[run_id] = PageTotals(Counts(*counts), pages_done, pages_seen)
    return totals


def page_counts(conn: Connection, run_id: str) -> dict[int, Counts]:
    """Each page's counts, async job outcomes included (what Redis holds for the page)."""
    pages = job_queries.pages_with_outcomes([run_id])
    stmt = select(pages.c.page_index, *(pages.c[name] for name in PAGE_COUNT_COLUMNS))
    return {index: Counts(*counts) for index, *counts in conn.execute(stmt)}


def claimed_keys(conn: Connection, run_id: str) -> dict[str, int]:
    """Record key -> owning page; a key claimed by two pages belongs to the lower index.

    Every page row lists the keys it owns, as the ledger decided (``replace_pages``), so
    no key is on two pages unless written by an older release.
    """
    stmt = (
        select(_pages.c.page_index, _pages.c.claimed_keys)
        .where(_pages.c.run_id == run_id)
        .order_by(_pages.c.page_index)
    )
    owners: dict[str, int] = {}
    for page_index, keys in conn.execute(stmt):
        for key in json.loads(keys):
            owners.setdefault(key, page_index)
    # Once the ledger decides (after a loss, or dedup="flow"), a key stays with the page
    # that claimed it first in flow_run_keys, even when that page's latest attempt did not
    # take it (Redis refused it then): a rebuild must not hand it to another page.
    owners.update(run_key_queries.run_key_owners(conn, run_id))
    return owners


def rejected_records(conn: Connection, run_id: str, limit: int) -> list[StoredReject]:
    stmt = (
        select(_rejects)
        .where(_rejects.c.run_id == run_id)
        .order_by(_rejects.c.page_index, _rejects.c.position)
        .limit(limit)
    )
    return [StoredReject(**row._mapping) for row in conn.execute(stmt)]


def job_failures(conn: Connection, run_id: str, limit: int) -> list[StoredFailure]:
    """Failed jobs of a run, handled inline or by workers, by page and record key."""
    stmt = (
        select(_failures)
        .where(_failures.c.run_id == run_id)
        .order_by(_failures.c.page_index, _failures.c.record_key)
        .limit(limit)
    )
    rows = [dict(row._mapping) for row in conn.execute(stmt)]
    rows += job_queries.failed_jobs(conn, run_id, limit)
    rows.sort(key=lambda row: (row["page_index"], row["record_key"]))
    return [StoredFailure(**row) for row in rows[:limit]]
