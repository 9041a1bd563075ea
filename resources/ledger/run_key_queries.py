"""SQL of ``flow_run_keys``: which page of a run owns each record key, once Redis lost the run.

Redis claims keys first, as the fast path. Its claims are lost with it (FLUSHALL, restart,
eviction), and a rebuild from the ledger cannot restore the claims of pages not yet
recorded, so two pages may then both believe they own a key. From the run's first loss on,
the page pre-write (``page_queries.replace_pages``) claims each page's keys again here,
and the first page recorded keeps the key: a key reaches the handler at most once per run
whatever Redis loses. A ``dedup="flow"`` run, which claims every key in the ledger anyway,
claims them here from its first page, and so does a run reopened after a finalization
(``revision > 0``), whose Redis state was removed and restored. (Otherwise, before a loss,
Redis alone decides and the page rows' ``claimed_keys`` say what it decided: a row per key
on the hot path would cost more than the rest of the hot path, bench/hotpath.py.) Given an
open transaction; no Dagster import.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from sqlalchemy import Connection, TextClause, text

# A step's claims in one statement, whatever its size: PostgreSQL takes them as two arrays,
# SQLite as one JSON document (no bound-parameter limit either way). Both insert in the
# order given, so a key claimed twice within the call goes to its first claim. No lock
# order to keep: the caller holds the run's row, so the run's claims are serialized.
_PG_CLAIM = text(
    """
INSERT INTO flow_run_keys (run_id, record_key, page_index)
SELECT :run_id, claim.record_key, claim.page_index
FROM unnest(CAST(:keys AS TEXT[]), CAST(:pages AS INTEGER[])) AS claim(record_key, page_index)
ON CONFLICT (run_id, record_key) DO NOTHING
"""
)
_PG_LOST = text(
    """
SELECT claim.page_index, claim.record_key, owner.page_index
FROM unnest(CAST(:keys AS TEXT[]), CAST(:pages AS INTEGER[])) AS claim(record_key, page_index)
JOIN flow_run_keys AS owner
    ON owner.run_id = :run_id AND owner.record_key = claim.record_key
WHERE owner.page_index <> claim.page_index
"""
)
# ``WHERE true`` lets SQLite parse ON CONFLICT after INSERT ... SELECT ... FROM.
_SQLITE_CLAIM = text(
    """
INSERT INTO flow_run_keys (run_id, record_key, page_index)
SELECT :run_id, claim.value, json_extract(page.value, '$[0]')
FROM json_each(:claims) AS page, json_each(page.value, '$[1]') AS claim
WHERE true
ON CONFLICT (run_id, record_key) DO NOTHING
"""
)
# CROSS JOIN fixes SQLite's join order: each claim looks its key up by primary key (left
# to choose, the planner may scan the table once per claim).
_SQLITE_LOST = text(
    """
SELECT json_extract(page.value, '$[0]'), claim.value, owner.page_index
FROM json_each(:claims) AS page
CROSS JOIN json_each(page.value, '$[1]') AS claim
CROSS JOIN flow_run_keys AS owner
WHERE owner.run_id = :run_id AND owner.record_key = claim.value
    AND owner.page_index <> json_extract(page.value, '$[0]')
"""
)


def claim_run_keys(
    conn: Connection, run_id: str, claims: Mapping[int, Sequence[str]]
) -> dict[int, dict[str, int]]:
    """Claim each page's keys for the run; per page, the keys another page owns (and its index).

    ``claims`` maps a page index to the keys it believes it owns (Redis gave them to it).
    A key is the page's if it claimed it now or an earlier attempt of the same page did; a
    key another page of the run claimed first is that page's. Call it holding the run's
    ``flow_metrics`` row (as ``replace_pages`` does). At most two statements: an
    ``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` of every claim, then, only when it
    inserted fewer rows than claims (a retried page, or a key two pages claimed after Redis
    lost the run), a ``SELECT`` of the claims whose key another page owns.
    """
    claimed = sum(len(keys) for keys in claims.values())
    if not claimed:
        return {}
    if conn.dialect.name == "postgresql":
        params: dict[str, object] = {
            "run_id": run_id,
            "keys": [key for keys in claims.values() for key in keys],
            "pages": [page for page, keys in claims.items() for _ in keys],
        }
        claim, lost = _PG_CLAIM, _PG_LOST
    else:
        packed = json.dumps(list(claims.items()), ensure_ascii=False, separators=(",", ":"))
        params = {"run_id": run_id, "claims": packed}
        claim, lost = _SQLITE_CLAIM, _SQLITE_LOST
    if conn.execute(claim, params).rowcount == claimed:
        return {}
    return _lost_claims(conn, lost, params)


def _lost_claims(
    conn: Connection, stmt: TextClause, params: Mapping[str, object]
) -> dict[int, dict[str, int]]:
    lost: dict[int, dict[str, int]] = {}
    for page, key, owner in conn.execute(stmt, params):
        lost.setdefault(int(page), {})[key] = int(owner)
    return lost


def run_key_owners(conn: Connection, run_id: str) -> dict[str, int]:
    """Record key -> the page that owns it in ``flow_run_keys`` (empty until the ledger
    decides the run's keys)."""
    stmt = text("SELECT record_key, page_index FROM flow_run_keys WHERE run_id = :run_id")
    return {key: page_index for key, page_index in conn.execute(stmt, {"run_id": run_id})}
