"""Lua scripts of pages whose jobs go to RQ workers (dispatch="rq"), with typed wrappers.

A page whose jobs run elsewhere is recorded once at dispatch, with its jobs pending; each
job's outcome then arrives as an ack from a worker. RECORD_DISPATCHED_PAGE and ACK_JOBS
keep the run's Redis state equal to the SQL ledger: the page's packed counts (``pages``)
and the run totals (``totals``) move together, so a rebuild from the ledger gives the same
numbers. They follow the rules of every run-counter script (``resources.live.lua``).

The SQL ack (``resources.ledger.job_queries.ack_jobs``) is the per-job guard: it returns only
transitions that really happened, and only those are sent here. ACK_JOBS adds its own
guard: a page's pending count never goes negative and its failed count never below zero,
whatever a confused caller sends. REMOVE_QUEUED takes a final run's waiting jobs out of
their RQ queue. No Dagster import: RQ workers use this module.
"""

from __future__ import annotations

import redis

from resources.counts import Counts
from resources.live.keys import run_keys
from resources.live.lua import Outcome, outcome, registered, reply_text

#: Record a page's counts at dispatch, keeping the job outcomes already acked.
#:
#: KEYS[1..4] = meta, seen, pages, totals of the run (meta: 'claims' = HLEN seen,
#:   'pages' = HLEN pages; pages: page index -> packed counts 'source,...,failed')
#: ARGV[1] = page index
#: ARGV[2] = TTL in seconds, refreshed on all four keys
#: ARGV[3..6] = the page's counts at dispatch: source, dispatched, skipped, rejected
#: Returns 'LOST' if the run's state is missing or incomplete; else 'DONE'.
#: Replaces the page's dispatch counts but keeps its completed and failed counts: jobs of
#: an earlier attempt of the page may already have been acked. Totals move by
#: (new - old) per field, as with lua_pages.RECORD_PAGE.
RECORD_DISPATCHED_PAGE = """
-- intact(), refresh(ttl), unpack_counts(packed): the same in every run-counter script
-- (see resources/live/lua.py)
local function intact()
    if redis.call('EXISTS', KEYS[1]) == 0 then
        return false
    end
    local claims = tonumber(redis.call('HGET', KEYS[1], 'claims') or '0')
    local pages = tonumber(redis.call('HGET', KEYS[1], 'pages') or '0')
    return redis.call('HLEN', KEYS[2]) == claims and redis.call('HLEN', KEYS[3]) == pages
end
local function refresh(ttl)
    for i = 1, 4 do
        redis.call('EXPIRE', KEYS[i], ttl)
    end
end
local function unpack_counts(packed)
    local counts = {}
    for value in string.gmatch(packed, '[^,]+') do
        counts[#counts + 1] = tonumber(value)
    end
    return counts
end

if not intact() then
    return 'LOST'
end
local fields = {'source', 'dispatched', 'skipped', 'rejected', 'completed', 'failed'}
local old = {0, 0, 0, 0, 0, 0}
local packed = redis.call('HGET', KEYS[3], ARGV[1])
if packed then
    old = unpack_counts(packed)
else
    redis.call('HINCRBY', KEYS[1], 'pages', 1)
end
local new = {}
for i, field in ipairs(fields) do
    if i > 4 then
        new[i] = old[i]  -- completed, failed: kept
    else
        new[i] = tonumber(ARGV[2 + i])
    end
    -- HINCRBY by 0 too, so every field of totals exists once a page is recorded.
    redis.call('HINCRBY', KEYS[4], field, new[i] - old[i])
end
redis.call('HSET', KEYS[3], ARGV[1], table.concat(new, ','))
refresh(ARGV[2])
return 'DONE'
"""


def record_dispatched_page(
    client: redis.Redis, flow: str, run_id: str, page_index: int, counts: Counts, ttl: int
) -> Outcome:
    """Run RECORD_DISPATCHED_PAGE: the page's dispatch counts, acks already counted kept.

    DONE, or LOST when Redis lost the run.
    """
    if counts.completed or counts.failed:
        raise ValueError(f"page {page_index}: dispatch counts carry no outcomes, got {counts}")
    args = [page_index, ttl, counts.source, counts.dispatched, counts.skipped, counts.rejected]
    script = registered(client, RECORD_DISPATCHED_PAGE)
    return outcome(script(keys=run_keys(flow, run_id), args=args))


#: Apply one page's job transitions (from the SQL ack) to the live counters.
#:
#: KEYS[1..4] = meta, seen, pages, totals of the run (as in RECORD_DISPATCHED_PAGE)
#: ARGV[1] = page index
#: ARGV[2] = TTL in seconds, refreshed on all four keys
#: ARGV[3] = jobs of the page that went pending -> completed
#: ARGV[4] = jobs of the page that went pending -> failed
#: ARGV[5] = jobs of the page that went failed -> completed
#: Returns 'LOST' if the run's state is missing or incomplete; 'NOOP' if nothing changed
#: (all zero, the page is not recorded, or the ack would take the page's pending or failed
#: count below zero); 'ZERO' if applied and no job of the run is pending any more; else
#: 'DONE' (applied, jobs of the run still pending).
ACK_JOBS = """
-- intact(), refresh(ttl), unpack_counts(packed): the same in every run-counter script
-- (see resources/live/lua.py)
local function intact()
    if redis.call('EXISTS', KEYS[1]) == 0 then
        return false
    end
    local claims = tonumber(redis.call('HGET', KEYS[1], 'claims') or '0')
    local pages = tonumber(redis.call('HGET', KEYS[1], 'pages') or '0')
    return redis.call('HLEN', KEYS[2]) == claims and redis.call('HLEN', KEYS[3]) == pages
end
local function refresh(ttl)
    for i = 1, 4 do
        redis.call('EXPIRE', KEYS[i], ttl)
    end
end
local function unpack_counts(packed)
    local counts = {}
    for value in string.gmatch(packed, '[^,]+') do
        counts[#counts + 1] = tonumber(value)
    end
    return counts
end

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
return 'DONE'
"""


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
) -> Outcome:
    """Run ACK_JOBS: apply one page's job transitions (from the SQL ack).

    LOST, NOOP, DONE (jobs of the run still pending) or ZERO (none pending any more).
    """
    script = registered(client, ACK_JOBS)
    args = [page_index, ttl, completed, failed, recovered]
    return outcome(script(keys=run_keys(flow, run_id), args=args))


#: Remove from an RQ queue the job ids that start with a prefix, in one atomic pass: a
#: worker pops either a job this removes or one it keeps, never both. O(queue length);
#: the kept ids go back in their order.
#:
#: KEYS[1] = the RQ queue (list of job ids)
#: ARGV[1] = job id prefix
#: Returns the removed ids, in queue order.
REMOVE_QUEUED = """
local ids = redis.call('LRANGE', KEYS[1], 0, -1)
local prefix, n = ARGV[1], string.len(ARGV[1])
local keep, removed = {}, {}
for _, id in ipairs(ids) do
    if string.sub(id, 1, n) == prefix then
        removed[#removed + 1] = id
    else
        keep[#keep + 1] = id
    end
end
if #removed == 0 then
    return removed
end
redis.call('DEL', KEYS[1])
for start = 1, #keep, 5000 do
    redis.call('RPUSH', KEYS[1], unpack(keep, start, math.min(start + 4999, #keep)))
end
return removed
"""


def remove_queued(client: redis.Redis, queue_key: str, prefix: str) -> list[str]:
    """Run REMOVE_QUEUED: take the ids starting with ``prefix`` out of the queue; them."""
    script = registered(client, REMOVE_QUEUED)
    return [reply_text(job_id) for job_id in script(keys=[queue_key], args=[prefix])]
