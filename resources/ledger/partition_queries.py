"""SQL of a partition's runs in the ledger, for the schedule's "run it again?" decision.

Given an open transaction; no Dagster import.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, select

from resources.ledger.schema import flow_metrics

_fm = flow_metrics


def partition_runs(
    conn: Connection,
    flow_name: str,
    partition_key: str,
    statuses: Sequence[str] | None,
    limit: int,
) -> list[tuple[str, str]]:
    """``(run_id, flow_status)`` of the flow's runs of one partition, newest first,
    optionally only those in ``statuses``."""
    stmt = (
        select(_fm.c.run_id, _fm.c.flow_status)
        .where(_fm.c.flow_name == flow_name, _fm.c.partition_key == partition_key)
        .order_by(_fm.c.started_at.desc(), _fm.c.run_id.desc())
        .limit(limit)
    )
    if statuses is not None:
        stmt = stmt.where(_fm.c.flow_status.in_(list(statuses)))
    return [(run_id, status) for run_id, status in conn.execute(stmt)]
