"""SQL of jobs dispatched to workers (``flow_async_jobs``): registration and guarded acks.

A job's state moves pending -> completed | failed and failed -> completed, never back; an
ack repeating a transition (a redelivered or duplicated callback) matches no row and
changes nothing. Every function is given an open transaction. No Dagster import: RQ
workers use this module directly.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Subquery,
    and_,
    case,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from resources.schema import (
    PAGE_COUNT_COLUMNS,
    RUNNING_PREDICATE,
    flow_async_jobs,
    flow_metrics,
    flow_page_progress,
)

_jobs, _fm, _pages = flow_async_jobs, flow_metrics, flow_page_progress
_IN_CHUNK = 500
# Acks move the run's updated_at (its last progress, which the finalizer's deadline
# measures) at most this often, so many workers do not queue on the run's row lock.
PROGRESS_EVERY = timedelta(seconds=1)
DEFAULT_ERROR = "failed (no error text)"


@dataclass
class JobDeltas:
    """What one ack changed on one page: its jobs that left pending, and failed ones that
    completed on a later attempt. All zero when the ack repeated earlier transitions."""

    completed: int = 0  # pending -> completed
    failed: int = 0  # pending -> failed
    recovered: int = 0  # failed -> completed

    def __bool__(self) -> bool:
        return bool(self.completed or self.failed or self.recovered)


def _chunks(values: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), _IN_CHUNK):
        yield values[start : start + _IN_CHUNK]


def register_jobs(
    conn: Connection, run_id: str, page_index: int, job_ids: Mapping[str, str], now: datetime
) -> set[str]:
    """Add a page's jobs as pending (existing rows keep their state); the keys still pending.

    A retried page registers the same jobs again: outcomes already acked stay, so only the
    returned keys may need their jobs enqueued again.
    """
    if not job_ids:
        return set()
    rows = [
        {
            "run_id": run_id,
            "record_key": key,
            "page_index": page_index,
            "job_id": job_id,
            "state": "pending",
            "updated_at": now,
        }
        for key, job_id in sorted(job_ids.items())  # one lock order for every writer
    ]
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = (
        dialect.insert(_jobs)
        .on_conflict_do_nothing(index_elements=["run_id", "record_key"])
        .returning(_jobs.c.record_key)  # RETURNING batches the rows into few statements
    )
    pending = set(conn.execute(stmt, rows).scalars())
    for chunk in _chunks(sorted(set(job_ids) - pending)):
        stmt = select(_jobs.c.record_key).where(
            _jobs.c.run_id == run_id, _jobs.c.record_key.in_(chunk), _jobs.c.state == "pending"
        )
        pending.update(conn.execute(stmt).scalars())
    return pending


def ack_jobs(
    conn: Connection,
    run_id: str,
    completed: Sequence[str],
    failed: Mapping[str, str],
    now: datetime,
) -> dict[int, JobDeltas]:
    """Apply job outcomes as guarded transitions; what changed, by page index.

    ``completed`` keys move from pending or failed; ``failed`` keys (key -> error text)
    move from pending only, so a late failure never undoes a success. Keys that are not
    jobs of the run are ignored.
    """
    deltas: dict[int, JobDeltas] = {}
    # A failed job keeps its error when it completes later, so a returned error tells a
    # recovery (failed -> completed) from a first outcome.
    for chunk in _chunks(sorted(set(completed))):
        stmt = (
            update(_jobs)
            .where(
                _jobs.c.run_id == run_id,
                _jobs.c.record_key.in_(chunk),
                _jobs.c.state != "completed",
            )
            .values(state="completed", updated_at=now)
            # The column, not `error IS NOT NULL`: SQLite 3.40 evaluates that expression
            # wrongly in a RETURNING clause.
            .returning(_jobs.c.page_index, _jobs.c.error)
        )
        for page_index, error in conn.execute(stmt):
            delta = deltas.setdefault(page_index, JobDeltas())
            if error is not None:
                delta.recovered += 1
            else:
                delta.completed += 1
    by_error: dict[str, list[str]] = {}
    succeeded = set(completed)
    for key, error in failed.items():
        if key not in succeeded:
            by_error.setdefault(error or DEFAULT_ERROR, []).append(key)
    for error, keys in by_error.items():
        for chunk in _chunks(sorted(keys)):
            stmt = (
                update(_jobs)
                .where(
                    _jobs.c.run_id == run_id,
                    _jobs.c.record_key.in_(chunk),
                    _jobs.c.state == "pending",
                )
                .values(state="failed", error=error, updated_at=now)
                .returning(_jobs.c.page_index)
            )
            for page_index in conn.execute(stmt).scalars():
                deltas.setdefault(page_index, JobDeltas()).failed += 1
    if any(deltas.values()):
        _note_progress(conn, run_id, now)
    return deltas


def _note_progress(conn: Connection, run_id: str, now: datetime) -> None:
    stmt = (
        update(_fm)
        .where(
            _fm.c.run_id == run_id,
            text(RUNNING_PREDICATE),
            _fm.c.updated_at < now - PROGRESS_EVERY,
        )
        .values(updated_at=now)
    )
    conn.execute(stmt)


def outcomes_by_page(run_ids: Sequence[str]) -> Subquery:
    """Completed and failed jobs per (run, page) of ``run_ids``: join it to the page rows."""
    state = _jobs.c.state
    return (
        select(
            _jobs.c.run_id,
            _jobs.c.page_index,
            func.sum(case((state == "completed", 1), else_=0)).label("completed"),
            func.sum(case((state == "failed", 1), else_=0)).label("failed"),
        )
        .where(_jobs.c.run_id.in_(run_ids))
        .group_by(_jobs.c.run_id, _jobs.c.page_index)
        .subquery("job_outcomes")
    )


def pages_with_outcomes(run_ids: Sequence[str]) -> Subquery:
    """Page rows of ``run_ids`` with async outcomes added to completed and failed;
    ``has_jobs`` is NULL for a page without async jobs."""
    jobs = outcomes_by_page(run_ids)
    joined = _pages.outerjoin(
        jobs, and_(jobs.c.run_id == _pages.c.run_id, jobs.c.page_index == _pages.c.page_index)
    )
    columns: list[ColumnElement[Any]] = [_pages.c.run_id, _pages.c.page_index, _pages.c.status]
    for name in PAGE_COUNT_COLUMNS:
        column: ColumnElement[Any] = _pages.c[name]
        if name in ("completed", "failed"):
            column = column + func.coalesce(jobs.c[name], 0)
        columns.append(column.label(name))
    pages = (
        select(*columns, jobs.c.run_id.label("has_jobs"))
        .select_from(joined)
        .where(_pages.c.run_id.in_(run_ids))
        .subquery("pages")
    )
    return pages


def failed_jobs(conn: Connection, run_id: str, limit: int) -> list[dict[str, Any]]:
    """Failed async jobs of a run as ``flow_job_failures``-shaped rows, by page and key."""
    stmt = (
        select(
            _jobs.c.run_id,
            _jobs.c.record_key,
            _jobs.c.page_index,
            _jobs.c.error,
            _jobs.c.updated_at.label("created_at"),
        )
        .where(_jobs.c.run_id == run_id, _jobs.c.state == "failed")
        .order_by(_jobs.c.page_index, _jobs.c.record_key)
        .limit(limit)
    )
    return [dict(row._mapping) for row in conn.execute(stmt)]
