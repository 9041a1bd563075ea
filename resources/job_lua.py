"""Lua scripts and typed wrappers for jobs dispatched to workers (dispatch="rq").

A page whose jobs run elsewhere is recorded once at dispatch, with its jobs pending; each
job's outcome then arrives as an ack from a worker. Both scripts keep the run's Redis
state equal to the SQL ledger: the page's packed counts (``pages``) and the run totals
(``totals``) move together, so a rebuild from the ledger gives the same numbers. They
check and refresh the run's state exactly as ``resources.lua``'s scripts do.

The SQL ack (``resources.job_queries.ack_jobs``) is the per-job guard: it returns only
transitions that really happened, and only those are sent here. The script adds its own
guard: a page's pending count never goes negative and its failed count never below zero,
whatever a confused caller sends. No Dagster import: RQ workers use this module.
"""

from __future__ import annotations

import enum

import redis
from redis.commands.core import Script

from resources.counts import Counts
from resources.keys import run_keys
from resources.lua import _CHECK_STATE, LOST, store_page_counts

# Both scripts open with lua._CHECK_STATE (``intact()``, ``refresh(ttl)``): the same test
# of the run's state as the counters' own scripts, so all of them agree on a loss.
RECORD_DISPATCHED_PAGE = """
-- KEYS[1..4] = meta, seen, pages, totals of the run (meta: 'claims' = HLEN seen,
--   'pages' = HLEN pages; pages: page index -> packed counts 'source,...,failed')
-- ARGV[1] = page index
-- ARGV[2] = TTL in seconds, refreshed on all four keys
-- ARGV[3..6] = the page's counts at dispatch: source, dispatched, skipped, rejected
-- returns 'LOST' if the run's state is missing or incomplete; else 'OK'.
-- Replaces the page's dispatch counts but keeps its completed and failed counts: jobs
-- of an earlier attempt of the page may already have been acked.
""" + store_page_counts(keep_outcomes=True)

ACK_JOBS = (
    """
-- KEYS[1..4] = meta, seen, pages, totals of the run (as in RECORD_DISPATCHED_PAGE)
-- ARGV[1] = page index
-- ARGV[2] = TTL in seconds, refreshed on all four keys
-- ARGV[3] = jobs of the page that went pending -> completed
-- ARGV[4] = jobs of the page that went pending -> failed
-- ARGV[5] = jobs of the page that went failed -> completed
-- returns 'LOST' if the run's state is missing or incomplete; 'NOOP' if nothing changed
-- (all zero, the page is not recorded, or the ack would take the page's pending or
-- failed count below zero); 'ZERO' if applied and no job of the run is pending any more;
-- else 'DECREMENTED'.
"""
    + _CHECK_STATE
    + """
if not intact() then
    return 'LOST'
end
local done, failed, recovered = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local packed = redis.call('HGET', KEYS[3], ARGV[1])
if not packed or done + failed + recovered == 0 or done < 0 or failed < 0 or recovered < 0 then
    return 'NOOP'
end
local c = unpack_counts(packed)
-- c = source, dispatched, skipped, rejected, completed, failed
if done + failed > c[2] - c[5] - c[6] or recovered > c[6] then
    return 'NOOP'
end
c[5] = c[5] + done + recovered
c[6] = c[6] + failed - recovered
redis.call('HSET', KEYS[3], ARGV[1], table.concat(c, ','))
redis.call('HINCRBY', KEYS[4], 'completed', done + recovered)
redis.call('HINCRBY', KEYS[4], 'failed', failed - recovered)
refresh(ARGV[2])
local totals = redis.call('HMGET', KEYS[4], 'dispatched', 'completed', 'failed')
local left = tonumber(totals[1] or 0) - tonumber(totals[2] or 0) - tonumber(totals[3] or 0)
if left <= 0 then
    return 'ZERO'
end
return 'DECREMENTED'
"""
)


class Ack(enum.Enum):
    """What an ack did to the run's live counters."""

    LOST = "LOST"  # Redis has no state for the run: nothing written
    NOOP = "NOOP"  # nothing to apply, or refused by the guard
    DECREMENTED = "DECREMENTED"  # applied; jobs of the run are still pending
    ZERO = "ZERO"  # applied; no job of the run is pending
    # Not a script's answer: the run was final when the ack came. Its outcome is recorded
    # as late in the ledger (job_queries.record_late), never counted; Redis is not touched.
    LATE = "LATE"


def _script(client: redis.Redis, source: str) -> Script:
    # Cheap (a SHA1 of the source); the Script reloads itself after NOSCRIPT.
    return client.register_script(source)


def _keys(flow: str, run_id: str) -> list[str]:
    return run_keys(flow, run_id)  # meta, seen, pages, totals


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def record_dispatched_page(
    client: redis.Redis, flow: str, run_id: str, page_index: int, counts: Counts, ttl: int
) -> bool:
    """Record a page's dispatch counts, keeping acks already counted; False when LOST."""
    if counts.completed or counts.failed:
        raise ValueError(f"page {page_index}: dispatch counts carry no outcomes, got {counts}")
    args = [page_index, ttl, counts.source, counts.dispatched, counts.skipped, counts.rejected]
    script = _script(client, RECORD_DISPATCHED_PAGE)
    return _text(script(keys=_keys(flow, run_id), args=args)) != LOST


def ack_jobs(
    client: redis.Redis,
    flow: str,
    run_id: str,
    page_index: int,
    ttl: int,
    *,
    completed: int = 0,
    failed: int = 0,
    recovered: int = 0,
) -> Ack:
    """Apply one page's job transitions (from the SQL ack) to the live counters."""
    script = _script(client, ACK_JOBS)
    args = [page_index, ttl, completed, failed, recovered]
    return Ack(_text(script(keys=_keys(flow, run_id), args=args)))
