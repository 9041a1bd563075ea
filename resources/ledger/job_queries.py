"""SQL of jobs dispatched to workers (``flow_async_jobs``): registration and guarded acks.

A job's state moves pending -> completed | failed and failed -> completed, never back; an
ack repeating a transition (a redelivered or duplicated callback) matches no row and
changes nothing. Every function is given an open transaction. No Dagster import: RQ
workers use this module directly.

An ack that arrives once the run is final (its jobs were counted failed, "lost", by the
finalizer) changes no state: the final row must keep equal to the ledger's totals. It is
recorded as *late* instead: ``late_at`` is set and the late outcome can be read back
(``late_outcomes``): a late failure keeps its error in ``error`` (the row stays pending),
a late success is a late row that is failed, or pending without an error.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Subquery,
    Update,
    and_,
    case,
    func,
    not_,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from resources.batching import IN_LIST_SIZE, batched
from resources.ledger.schema import (
    PAGE_COUNT_COLUMNS,
    RUNNING_PREDICATE,
    flow_async_jobs,
    flow_metrics,
    flow_page_progress,
)
from resources.run_policy import RunPolicy

_jobs, _fm, _pages = flow_async_jobs, flow_metrics, flow_page_progress
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


@dataclass
class AckResult:
    """What one ack did in the ledger.

    ``deltas``: the transitions applied, by page (the run was running). ``run_final``: the
    run was final (or unknown) when the ack arrived, so nothing was counted; ``late`` of
    its outcomes were recorded as late now (0: all of them had been before, or were no
    transition at all), ``completed_late`` (key -> page) the successes among them.
    """

    deltas: dict[int, JobDeltas] = field(default_factory=dict)
    run_final: bool = False
    gate: RunGate | None = None
    late: int = 0
    completed_late: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RunGate:
    """What a worker checks before running a job of a run: its status and policy."""

    flow_name: str
    status: str
    policy: RunPolicy | None
    awaiting_dagster: bool = False

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def runs_jobs(self) -> bool:
        """Its jobs still run: it is running, or was declared stalled while its Dagster run
        still works (it is decided again when that run ends, counting their late outcomes)."""
        return self.running or self.awaiting_dagster


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
    for chunk in batched(sorted(set(job_ids) - pending), IN_LIST_SIZE):
        stmt = select(_jobs.c.record_key).where(
            _jobs.c.run_id == run_id, _jobs.c.record_key.in_(chunk), _jobs.c.state == "pending"
        )
        pending.update(conn.execute(stmt).scalars())
    return pending


def run_gate(conn: Connection, run_id: str, *, lock: bool = False) -> RunGate | None:
    """The run's status and policy; None for an unknown run.

    ``lock``: hold a KEY SHARE lock on the run's row until the transaction ends
    (PostgreSQL; SQLite's write transaction is exclusive already). The finalizer's
    ``FOR UPDATE`` conflicts with it, so an ack either commits before a run is finalized
    or sees it final; acks do not block each other, nor their progress updates.
    """
    stmt = select(
        _fm.c.flow_name, _fm.c.flow_status, _fm.c.run_policy, _fm.c.awaiting_dagster
    ).where(_fm.c.run_id == run_id)
    if lock:
        stmt = stmt.with_for_update(read=True, key_share=True)
    row = conn.execute(stmt).one_or_none()
    if row is None:
        return None
    flow_name, status, policy, awaiting = row
    return RunGate(flow_name, status, RunPolicy.from_json(policy) if policy else None, awaiting)


def ack_jobs(
    conn: Connection,
    run_id: str,
    completed: Sequence[str],
    failed: Mapping[str, str],
    now: datetime,
) -> AckResult:
    """Apply job outcomes as guarded transitions; what changed, by page index.

    ``completed`` keys move from pending or failed; ``failed`` keys (key -> error text)
    move from pending only, so a late failure never undoes a success. Keys that are not
    jobs of the run are ignored. Once the run is final nothing moves: the outcomes are
    recorded as late (``record_late``).
    """
    gate = run_gate(conn, run_id, lock=True)
    if gate is None:
        return AckResult(run_final=True)
    if not gate.running:
        result = record_late(conn, run_id, completed, failed, now)
        result.gate = gate
        return result
    deltas: dict[int, JobDeltas] = {}
    for chunk in batched(sorted(set(completed)), IN_LIST_SIZE):
        # The state before, not the error, tells a first outcome from a recovery.
        for source, kind in (("pending", "completed"), ("failed", "recovered")):
            values: dict[str, Any] = {"state": "completed", "late_at": None, "updated_at": now}
            if source == "pending":
                values["error"] = None  # a late failure's error, if a reopened run had one
            stmt = (
                _update_jobs(run_id, chunk, _jobs.c.state == source)
                .values(values)
                .returning(_jobs.c.page_index)
            )
            for page_index in conn.execute(stmt).scalars():
                delta = deltas.setdefault(page_index, JobDeltas())
                setattr(delta, kind, getattr(delta, kind) + 1)
    for error, keys in _failed_by_error(completed, failed):
        stmt = (
            _update_jobs(run_id, keys, _jobs.c.state == "pending")
            .values(state="failed", error=error, late_at=None, updated_at=now)
            .returning(_jobs.c.page_index)
        )
        for page_index in conn.execute(stmt).scalars():
            deltas.setdefault(page_index, JobDeltas()).failed += 1
    if any(deltas.values()):
        _note_progress(conn, run_id, now)
    return AckResult(deltas)


def _failed_by_error(
    completed: Sequence[str], failed: Mapping[str, str]
) -> Iterator[tuple[str, Sequence[str]]]:
    """Failed keys not also completed, grouped by error text, in chunks."""
    by_error: dict[str, list[str]] = {}
    succeeded = set(completed)
    for key, error in failed.items():
        if key not in succeeded:
            by_error.setdefault(error or DEFAULT_ERROR, []).append(key)
    for error, keys in by_error.items():
        for chunk in batched(sorted(keys), IN_LIST_SIZE):
            yield error, chunk


def record_late(
    conn: Connection,
    run_id: str,
    completed: Sequence[str],
    failed: Mapping[str, str],
    now: datetime,
) -> AckResult:
    """Outcomes that arrived after the run was final: set ``late_at``, change no state
    (the final row was computed from the states).

    Only what would have been a transition is recorded (a success of a job not completed,
    a failure of a pending one), once per job: the first late outcome stays.
    """
    result = AckResult(run_final=True)
    for chunk in batched(sorted(set(completed)), IN_LIST_SIZE):
        stmt = (
            _update_jobs(run_id, chunk, _jobs.c.state != "completed", _jobs.c.late_at.is_(None))
            .values(late_at=now)
            .returning(_jobs.c.record_key, _jobs.c.page_index)
        )
        result.completed_late.update({key: page for key, page in conn.execute(stmt)})
    result.late = len(result.completed_late)
    for error, keys in _failed_by_error(completed, failed):
        late_failure = _update_jobs(
            run_id, keys, _jobs.c.state == "pending", _jobs.c.late_at.is_(None)
        ).values(late_at=now, error=error)
        result.late += conn.execute(late_failure).rowcount
    return result


def _update_jobs(run_id: str, keys: Sequence[str], *conditions: Any) -> Update:
    """An UPDATE of the run's job rows for ``keys`` that also meet ``conditions``."""
    return update(_jobs).where(_jobs.c.run_id == run_id, _jobs.c.record_key.in_(keys), *conditions)


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


# A late row's outcome: a failed row can only have completed late; a pending one failed
# late if the late ack left its error, else it completed late.
_LATE_COMPLETED = or_(_jobs.c.state == "failed", _jobs.c.error.is_(None))


def count_late_outcomes(conn: Connection, run_id: str, now: datetime) -> int:
    """A reopened run: its late outcomes become its jobs' states (a late success completed,
    a late failure failed), so the next finalization counts them. Returns how many."""
    stmt = (
        update(_jobs)
        .where(_jobs.c.run_id == run_id, _jobs.c.late_at.is_not(None))
        .values(
            state=case((_LATE_COMPLETED, "completed"), else_="failed"),
            late_at=None,
            updated_at=now,
        )
    )
    return conn.execute(stmt).rowcount


def late_counts(conn: Connection, run_ids: Sequence[str]) -> dict[str, int]:
    """Jobs of each run whose outcome arrived after the run was final (0 if none)."""
    counts = dict.fromkeys(run_ids, 0)
    for chunk in batched(list(dict.fromkeys(run_ids)), IN_LIST_SIZE):
        stmt = (
            select(_jobs.c.run_id, func.count())
            .where(_jobs.c.run_id.in_(chunk), _jobs.c.late_at.is_not(None))
            .group_by(_jobs.c.run_id)
        )
        counts.update({run_id: int(n) for run_id, n in conn.execute(stmt)})
    return counts


def late_outcomes(conn: Connection, run_id: str, limit: int) -> list[dict[str, Any]]:
    """A run's late outcomes by page and key: ``record_key``, ``page_index``, ``outcome``
    (``completed`` or ``failed``), ``error`` (a late failure's, or the failure a late
    success came after), ``late_at``."""
    outcome = case((_LATE_COMPLETED, "completed"), else_="failed")
    stmt = (
        select(
            _jobs.c.record_key,
            _jobs.c.page_index,
            outcome.label("outcome"),
            _jobs.c.error,
            _jobs.c.late_at,
        )
        .where(_jobs.c.run_id == run_id, _jobs.c.late_at.is_not(None))
        .order_by(_jobs.c.page_index, _jobs.c.record_key)
        .limit(limit)
    )
    return [dict(row._mapping) for row in conn.execute(stmt)]


def unfinished_keys(conn: Connection, run_id: str) -> list[str]:
    """Keys of the run's async jobs counted failed when it was finalized (failed, or still
    pending: lost) whose job did not complete late after all."""
    completed_late = and_(_jobs.c.late_at.is_not(None), _LATE_COMPLETED)
    stmt = select(_jobs.c.record_key).where(
        _jobs.c.run_id == run_id, _jobs.c.state != "completed", not_(completed_late)
    )
    return list(conn.execute(stmt).scalars())
