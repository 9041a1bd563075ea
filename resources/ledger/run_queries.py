"""SQL of a run's row in ``flow_metrics``: start, plan, heartbeat, the finalizer's reads and
its compare-and-set final write, reopen, publish. One function per operation, each given an
open transaction; all SQL parameterized (the partial-index predicates are verbatim literals,
for the planner)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    bindparam,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import Update

from resources.batching import IN_LIST_SIZE, batched
from resources.ledger import flow_key_queries, job_queries
from resources.ledger.page_queries import check_still_recording, page_totals
from resources.ledger.records import (
    FinalState,
    RunRow,
)
from resources.ledger.schema import (
    AWAITING_PREDICATE,
    RUNNING_PREDICATE,
    UNPUBLISHED_PREDICATE,
    flow_metrics,
)

_fm = flow_metrics


def insert_run(
    conn: Connection,
    run_id: str,
    flow_name: str,
    partition_key: str | None,
    started_at: datetime,
    run_policy: str | None,
) -> None:
    """Insert the run's row as ``running``; an existing row keeps its values, but gets the
    policy if it had none (a row written by an older release)."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(_fm).values(
        run_id=run_id,
        flow_name=flow_name,
        partition_key=partition_key,
        flow_status="running",
        started_at=started_at,
        updated_at=started_at,
        run_policy=run_policy,
    )
    conn.execute(stmt.on_conflict_do_nothing(index_elements=["run_id"]))
    if run_policy is not None:
        conn.execute(
            update(_fm)
            .where(_fm.c.run_id == run_id, _fm.c.run_policy.is_(None))
            .values(run_policy=run_policy)
        )


def record_plan(
    conn: Connection, run_id: str, pages_total: int, reported_total: int | None, now: datetime
) -> int:
    """The plan fanned out pages ``0 .. pages_total - 1``; the source said it holds
    ``reported_total`` records (None: it did not say)."""
    stmt = (
        update(_fm)
        .where(_fm.c.run_id == run_id)
        .values(pages_total=pages_total, source_reported_total=reported_total, updated_at=now)
    )
    return _still_recording(conn, run_id, stmt)


def mark_extraction_done(conn: Connection, run_id: str, now: datetime) -> int:
    """Collect's hint that every step ran (the finalizer proves it from the page rows)."""
    stmt = update(_fm).where(_fm.c.run_id == run_id).values(extraction_done=True, updated_at=now)
    return _still_recording(conn, run_id, stmt)


def _still_recording(conn: Connection, run_id: str, stmt: Update) -> int:
    """Run an update of the run's row: 0 if the run is unknown; ``RunFinalError`` (the
    transaction rolled back) if it is final: its final row stands."""
    row = conn.execute(stmt.returning(_fm.c.flow_status, _fm.c.awaiting_dagster)).first()
    if row is None:
        return 0
    check_still_recording(run_id, row.flow_status, row.awaiting_dagster)
    return 1


def heartbeat(conn: Connection, run_id: str, now: datetime) -> int:
    """A step of the running run is alive: its progress clock moves (stalled = silent)."""
    stmt = update(_fm).where(_fm.c.run_id == run_id, text(RUNNING_PREDICATE)).values(updated_at=now)
    return conn.execute(stmt).rowcount


def note_source_down(conn: Connection, run_id: str, attempt: str, message: str) -> int:
    """Record that Dagster run ``attempt`` of the running run found its source down (the
    first note of that attempt is kept; a later attempt, a re-execution, starts afresh)."""
    if source_down(conn, run_id, attempt) is not None:
        return 0
    note = json.dumps({"attempt": attempt, "error": message})
    stmt = (
        update(_fm).where(_fm.c.run_id == run_id, text(RUNNING_PREDICATE)).values(source_down=note)
    )
    return conn.execute(stmt).rowcount


def source_down(conn: Connection, run_id: str, attempt: str) -> str | None:
    """The error with which Dagster run ``attempt`` found the source down, if it did."""
    stmt = select(_fm.c.source_down).where(_fm.c.run_id == run_id)
    note = conn.execute(stmt).scalar_one_or_none()
    if note is None:
        return None
    found = json.loads(note)
    return str(found["error"]) if found.get("attempt") == attempt else None


def awaiting_dagster_runs(conn: Connection, limit: int) -> list[RunRow]:
    """Final runs decided while their Dagster run was still in progress (stalled)."""
    stmt = select(_fm).where(text(AWAITING_PREDICATE)).order_by(_fm.c.run_id).limit(limit)
    return _run_rows(conn, stmt)


def _run_rows(conn: Connection, stmt: Any) -> list[RunRow]:
    return [RunRow(**row._mapping) for row in conn.execute(stmt)]


def running_runs(conn: Connection, limit: int) -> list[RunRow]:
    stmt = (
        select(_fm)
        .where(text(RUNNING_PREDICATE))
        .order_by(_fm.c.updated_at, _fm.c.run_id)
        .limit(limit)
    )
    return _run_rows(conn, stmt)


def unpublished_runs(conn: Connection, limit: int) -> list[RunRow]:
    stmt = (
        select(_fm)
        .where(text(UNPUBLISHED_PREDICATE))
        .order_by(_fm.c.finished_at, _fm.c.run_id)
        .limit(limit)
    )
    return _run_rows(conn, stmt)


def runs(conn: Connection, flow_name: str | None, run_id: str | None, limit: int) -> list[RunRow]:
    stmt = select(_fm).order_by(_fm.c.started_at.desc(), _fm.c.run_id.desc()).limit(limit)
    if flow_name is not None:
        stmt = stmt.where(_fm.c.flow_name == flow_name)
    if run_id is not None:
        stmt = stmt.where(_fm.c.run_id == run_id)
    return _run_rows(conn, stmt)


def finalize_many(conn: Connection, finals: Sequence[FinalState]) -> list[str]:
    """Compare-and-set the final rows; the run ids this call moved out of ``running``.

    The running rows are locked first (FOR UPDATE; SQLite's write transaction is
    exclusive already), so a concurrent finalizer waits and then finds them final: each
    run gets exactly one final state. Runs are locked in run id order, so two finalizers
    never wait on each other's locks (no deadlock). The writes go out as one executemany.

    A final state is written only if the run made no progress since it was decided: its
    ``last_progress_at`` (a page write, a heartbeat, an ack) and, where given, its
    ``ledger_counts`` must still hold under the lock. A run that moved between the
    finalizer's read and its lock is left for the next tick
    (and acks after the lock wait for it, then find the run final: late). In the same
    transaction the keys of failed jobs of ``dedup="flow"`` runs are released.
    """
    by_run = {final.run_id: final for final in finals}
    won: list[str] = []
    for chunk in batched(sorted(by_run), IN_LIST_SIZE):
        rows = conn.execute(
            select(_fm.c.run_id, _fm.c.started_at, _fm.c.updated_at)
            .where(_fm.c.run_id.in_(chunk), text(RUNNING_PREDICATE))
            .with_for_update()
        ).all()
        moved = _moved_since_decided(conn, [by_run[run_id] for run_id, _, _ in rows])
        moved |= {
            run_id
            for run_id, _, updated_at in rows
            if by_run[run_id].last_progress_at not in (None, updated_at)
        }
        locked = [(run_id, start) for run_id, start, _ in rows if run_id not in moved]
        if locked:
            conn.execute(
                _FINALIZE, [_final_values(by_run[run_id], start) for run_id, start in locked]
            )
            won.extend(run_id for run_id, _ in locked)
    flow_key_queries.release_failed_keys(conn, won)
    return won


def _moved_since_decided(conn: Connection, finals: Sequence[FinalState]) -> set[str]:
    """Runs whose ledger totals differ from the ones their final state was decided on."""
    decided = {f.run_id: f.ledger_counts for f in finals if f.ledger_counts is not None}
    if not decided:
        return set()
    now = page_totals(conn, list(decided))
    return {run_id for run_id, counts in decided.items() if now[run_id].counts != counts}


_FINALIZE = (
    update(_fm)
    .where(_fm.c.run_id == bindparam("b_run_id"), text(RUNNING_PREDICATE))
    .values(
        {
            "revision": _fm.c.revision + 1,
            **{
                column: bindparam(f"b_{column}")
                for column in (
                    "flow_status",
                    "source_record_count",
                    "dispatched_jobs",
                    "skipped_records",
                    "rejected_records",
                    "completed_jobs",
                    "failed_jobs",
                    "pages_done",
                    "finished_at",
                    "total_runtime_ms",
                    "failure_reason",
                    "counter_mismatch",
                    "awaiting_dagster",
                )
            },
        }
    )
)


def _final_values(final: FinalState, started_at: datetime) -> dict[str, Any]:
    counts = final.counts
    runtime_ms = final.runtime_ms
    if runtime_ms is None:
        runtime_ms = max(0, round((final.finished_at - started_at).total_seconds() * 1000))
    return {
        "b_run_id": final.run_id,
        "b_flow_status": final.status,
        "b_source_record_count": counts.source,
        "b_dispatched_jobs": counts.dispatched,
        "b_skipped_records": counts.skipped,
        "b_rejected_records": counts.rejected,
        "b_completed_jobs": counts.completed,
        "b_failed_jobs": counts.failed,
        "b_pages_done": final.pages_done,
        "b_finished_at": final.finished_at,
        "b_total_runtime_ms": runtime_ms,
        "b_failure_reason": final.failure_reason,
        "b_counter_mismatch": final.counter_mismatch,
        "b_awaiting_dagster": final.awaiting_dagster,
    }


def note_counter_mismatch(conn: Connection, run_id: str, note: str) -> int:
    """Keep the first note of a running run (later pages hitting the same loss add nothing)."""
    stmt = (
        update(_fm)
        .where(_fm.c.run_id == run_id, text(RUNNING_PREDICATE), _fm.c.counter_mismatch.is_(None))
        .values(counter_mismatch=note)
    )
    return conn.execute(stmt).rowcount


def reopen(conn: Connection, run_id: str, now: datetime) -> int:
    """Put a failed or cancelled run back to ``running`` (its Dagster run is re-executed,
    or ended after the run was declared stalled). Its reason is cleared (the next
    finalization writes it anew); a counter-mismatch note stays: that loss happened. RQ
    outcomes that came in late while it was final now count (the run is running again)."""
    stmt = (
        update(_fm)
        .where(_fm.c.run_id == run_id, _fm.c.flow_status.in_(("failed", "cancelled")))
        .values(
            flow_status="running",
            finished_at=None,
            total_runtime_ms=None,
            failure_reason=None,
            published_at=None,
            awaiting_dagster=False,
            extraction_done=False,
            source_down=None,
            updated_at=now,
        )
    )
    reopened = conn.execute(stmt).rowcount
    if reopened:
        job_queries.count_late_outcomes(conn, run_id, now)
    return reopened


def statuses(conn: Connection, run_ids: Sequence[str]) -> dict[str, tuple[str, int]]:
    """Run id -> ``(flow_status, revision)``; unknown ids are left out."""
    found: dict[str, tuple[str, int]] = {}
    for chunk in batched(list(dict.fromkeys(run_ids)), IN_LIST_SIZE):
        stmt = select(_fm.c.run_id, _fm.c.flow_status, _fm.c.revision).where(
            _fm.c.run_id.in_(chunk)
        )
        found.update(
            {run_id: (status, revision) for run_id, status, revision in conn.execute(stmt)}
        )
    return found


def mark_published(
    conn: Connection, revisions: Sequence[tuple[str, int]], at: datetime
) -> list[str]:
    """Mark each ``(run_id, revision)`` published if the run is still final at that
    revision (not reopened, nor finalized again, since it was read); the run ids marked."""
    marked: list[str] = []
    for chunk in batched(list(dict.fromkeys(revisions)), IN_LIST_SIZE):
        stmt = (
            update(_fm)
            .where(tuple_(_fm.c.run_id, _fm.c.revision).in_(chunk), text(UNPUBLISHED_PREDICATE))
            .values(published_at=at)
            .returning(_fm.c.run_id)
        )
        marked += [run_id for (run_id,) in conn.execute(stmt)]
    return marked
