"""SQL of dedup="flow": the durable table of keys a flow's runs dispatched.

Given an open transaction; no Dagster import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cache

from sqlalchemy import Connection, Insert, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from resources.ledger import job_queries
from resources.ledger.schema import (
    flow_async_jobs,
    flow_dispatched_keys,
    flow_job_failures,
    flow_metrics,
    flow_page_progress,
    flow_run_keys,
)
from resources.run_policy import RunPolicy

_dispatched, _fm = flow_dispatched_keys, flow_metrics
_RUNS_PER_SELECT = 500
# A page's keys in one statement each way, within SQLite's 32,766 bound parameters.
_KEY_ROWS_PER_INSERT = 5000  # 5 parameters a row
_KEYS_PER_SELECT = 10_000


def claim_flow_keys(
    conn: Connection,
    flow_name: str,
    run_id: str,
    page_index: int,
    record_keys: Sequence[str],
    now: datetime,
) -> list[bool]:
    """Claim keys for one page of a run across all runs of the flow; True where the run
    owns them.

    At most two statements for a page: an ``INSERT ... ON CONFLICT DO NOTHING RETURNING``
    (the keys this call claimed), then, only for the keys it did not, a ``SELECT`` of their
    owners. A key is the run's if this call claimed it or any page of the same run did
    (the stored page is the first claimer's): which page of the run owns it is decided by
    the run's own key table at the page pre-write (``run_key_queries``), so a page that
    loses a key there leaves no flow claim that would block the real owner's retry. A key
    repeated in ``record_keys`` counts at its first place.
    """
    unique = sorted(set(record_keys))  # one insert order for every writer: no deadlock cycle
    rows = _key_rows(flow_name, run_id, [(key, page_index) for key in unique], now)
    mine: set[str] = set()
    if rows:
        stmt = _insert_keys(conn.dialect.name)
        batched = conn.execution_options(insertmanyvalues_page_size=_KEY_ROWS_PER_INSERT)
        mine.update(batched.execute(stmt, rows).scalars())
    contested = [key for key in unique if key not in mine]
    for start in range(0, len(contested), _KEYS_PER_SELECT):
        chunk = contested[start : start + _KEYS_PER_SELECT]
        owners = select(_dispatched.c.record_key).where(
            _dispatched.c.flow_name == flow_name,
            _dispatched.c.record_key.in_(chunk),
            _dispatched.c.run_id == run_id,
        )
        mine.update(conn.execute(owners).scalars())
    flags, earlier = [], set()
    for key in record_keys:
        flags.append(key in mine and key not in earlier)
        earlier.add(key)
    return flags


@cache
def _insert_keys(dialect_name: str) -> Insert:
    stmt = (postgresql if dialect_name == "postgresql" else sqlite).insert(_dispatched)
    stmt = stmt.on_conflict_do_nothing(index_elements=["flow_name", "record_key"])
    return stmt.returning(_dispatched.c.record_key)


# --- keys of failed jobs: released when their run is final (issue 10) ----------------


def release_failed_keys(conn: Connection, run_ids: Sequence[str]) -> int:
    """Release the keys the failed jobs of final ``dedup="flow"`` runs hold; how many.

    A run's failed jobs are the ones its final row counts failed: failed inline
    (``flow_job_failures``), failed on a worker, and lost (still pending when the run was
    finalized: on a worker, or on a page whose step never finished). Their keys leave
    ``flow_dispatched_keys``, so the next run of the flow dispatches those records again.
    Left alone: runs still running; runs finalized while their Dagster run was still in
    progress (``awaiting_dagster``: its steps may yet finish pages; once that ends the
    finalizer reopens the run and decides it again); runs whose policy is
    ``dedup="run"`` or ``keep_failed_keys=True``, or that recorded no policy; keys another
    run owns now.

    Idempotent, safe to repeat after a crash. Locks the runs' rows (run id order, as
    ``run_queries.finalize_many``), so a late ack of the same run (``job_queries``) is
    applied wholly before or after. Call it inside the transaction that finalizes the runs
    to release exactly when they become final.
    """
    released = 0
    ordered = sorted(set(run_ids))
    for start in range(0, len(ordered), _RUNS_PER_SELECT):
        chunk = ordered[start : start + _RUNS_PER_SELECT]
        stmt = (
            select(_fm.c.run_id, _fm.c.flow_name, _fm.c.run_policy)
            .where(
                _fm.c.run_id.in_(chunk),
                _fm.c.flow_status != "running",
                _fm.c.awaiting_dagster.is_(False),
            )
            .order_by(_fm.c.run_id)
            .with_for_update()
        )
        for run_id, flow_name, policy_json in conn.execute(stmt).all():
            policy = RunPolicy.from_json(policy_json) if policy_json else None
            if policy is None or policy.dedup != "flow" or policy.keep_failed_keys:
                continue
            keys = sorted(
                {
                    *_failed_inline_keys(conn, run_id),
                    *_lost_inline_keys(conn, run_id),
                    *job_queries.unfinished_keys(conn, run_id),
                }
            )
            for at in range(0, len(keys), _KEYS_PER_SELECT):
                stmt_delete = delete(_dispatched).where(
                    _dispatched.c.flow_name == flow_name,
                    _dispatched.c.record_key.in_(keys[at : at + _KEYS_PER_SELECT]),
                    _dispatched.c.run_id == run_id,  # not a key another run claimed since
                )
                released += conn.execute(stmt_delete).rowcount
    return released


def reclaim_flow_keys(
    conn: Connection, flow_name: str, run_id: str, keys: Mapping[str, int], now: datetime
) -> int:
    """Claim again, for the run and page that dispatched them, keys whose job completed
    after the run was final (a late success: the record was handled). A key another run
    claimed meanwhile stays that run's. Returns how many were claimed."""
    rows = _key_rows(flow_name, run_id, sorted(keys.items()), now)
    if not rows:
        return 0
    batched = conn.execution_options(insertmanyvalues_page_size=_KEY_ROWS_PER_INSERT)
    return len(batched.execute(_insert_keys(conn.dialect.name), rows).scalars().all())


def _failed_inline_keys(conn: Connection, run_id: str) -> list[str]:
    stmt = select(flow_job_failures.c.record_key).where(flow_job_failures.c.run_id == run_id)
    return list(conn.execute(stmt).scalars())


def _lost_inline_keys(conn: Connection, run_id: str) -> list[str]:
    """Keys of inline pages written before their handler ran and never finished (the step
    died): every job of such a page was pending, counted failed (lost) at finalization.
    A page dispatched to workers has its jobs in ``flow_async_jobs`` instead."""
    pages, owners, jobs = flow_page_progress, flow_run_keys, flow_async_jobs
    on_workers = (
        select(jobs.c.run_id)
        .where(jobs.c.run_id == pages.c.run_id, jobs.c.page_index == pages.c.page_index)
        .exists()
    )
    stmt = (
        select(owners.c.record_key)
        .join(
            pages,
            (pages.c.run_id == owners.c.run_id) & (pages.c.page_index == owners.c.page_index),
        )
        .where(owners.c.run_id == run_id, pages.c.status == "dispatched", ~on_workers)
    )
    return list(conn.execute(stmt).scalars())


def _key_rows(
    flow_name: str, run_id: str, owners: Sequence[tuple[str, int]], now: datetime
) -> list[dict[str, object]]:
    """``flow_dispatched_keys`` rows: each (key, page) claimed for the run."""
    return [
        {
            "flow_name": flow_name,
            "record_key": key,
            "run_id": run_id,
            "page_index": page_index,
            "created_at": now,
        }
        for key, page_index in owners
    ]
