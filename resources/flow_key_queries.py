"""SQL of dedup="flow": the durable table of keys a flow's runs dispatched.

Given an open transaction; no Dagster import.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import cache

from sqlalchemy import Connection, Insert, select
from sqlalchemy.dialects import postgresql, sqlite

from resources.schema import flow_dispatched_keys

_dispatched = flow_dispatched_keys
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
    """Claim keys for one page of a run across all runs of the flow; True where it owns them.

    At most two statements for a page: an ``INSERT ... ON CONFLICT DO NOTHING RETURNING``
    (the keys this call claimed), then, only for the keys it did not, a ``SELECT`` of their
    owners. A key is this page's if it claimed it now or an earlier attempt of the same
    page of the same run did. A key repeated in ``record_keys`` counts at its first place.
    """
    unique = sorted(set(record_keys))  # one insert order for every writer: no deadlock cycle
    rows = [
        {
            "flow_name": flow_name,
            "record_key": key,
            "run_id": run_id,
            "page_index": page_index,
            "created_at": now,
        }
        for key in unique
    ]
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
            _dispatched.c.page_index == page_index,
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
