"""Lua scripts of the run counters: one round trip per page, atomic on the server.

Each script opens with its contract (KEYS, ARGV, return value). They are registered with
``redis.Redis.register_script``, which reloads a script after NOSCRIPT (``SCRIPT FLUSH``,
a restart, a failover), so callers never see that error. All keys of one call share the
run's hash tag, so the scripts also run on Redis Cluster.

Every script checks the run's state first: ``meta`` must exist and must agree with the
sizes of ``seen`` and ``pages`` (meta keeps how many fields each should hold). When it does
not, Redis has lost the run or part of it (restart, eviction, FLUSHALL, expiry) and writing
anything would count from a wrong base. The script then writes nothing and returns
``LOST``; the caller rebuilds the run from the SQL ledger and calls again. Every script
refreshes the TTL of all four keys, so they expire together.
"""

from __future__ import annotations

#: Returned by every script when the run's ``meta`` key is missing.
LOST = "LOST"

#: Returned by RECORD_PAGE when the page's counts were stored.
RECORDED = "OK"

# Shared opening of both scripts: KEYS[1..4] = meta, seen, pages, totals of one run.
_CHECK_STATE = """
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
"""

# Body of the page-recording scripts; ``keep_outcomes`` (set before it) keeps the page's
# completed and failed counts instead of replacing them (ARGV then ends after 'rejected').
_STORE_PAGE_COUNTS = """
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
    if keep_outcomes and i > 4 then
        new[i] = old[i]
    else
        new[i] = tonumber(ARGV[2 + i])
    end
    -- HINCRBY by 0 too, so every field of totals exists once a page is recorded.
    redis.call('HINCRBY', KEYS[4], field, new[i] - old[i])
end
redis.call('HSET', KEYS[3], ARGV[1], table.concat(new, ','))
refresh(ARGV[2])
return 'OK'
"""


def store_page_counts(*, keep_outcomes: bool) -> str:
    """The shared state check and page-recording body (see ``_STORE_PAGE_COUNTS``)."""
    flag = "true" if keep_outcomes else "false"
    return _CHECK_STATE + f"local keep_outcomes = {flag}\n" + _STORE_PAGE_COUNTS


CLAIM_PAGE = (
    """
-- KEYS[1] = meta key of the run: hash with 'claims' = HLEN of seen, 'pages' = HLEN of pages
-- KEYS[2] = seen key of the run: hash record key -> index of the page that owns it
-- KEYS[3] = pages key, KEYS[4] = totals key (only their TTL is refreshed here)
-- ARGV[1] = page index
-- ARGV[2] = TTL in seconds, refreshed on all four keys
-- ARGV[3] = the page's record keys, in page order, as one JSON array of strings (one
--   argument instead of one per key: packing a thousand arguments costs the client more
--   than cjson costs the server)
-- returns 'LOST' if the run's state is missing or incomplete; else a string of one flag per
--   record key, in order: '1' = owned by this page (dispatch it), '0' = duplicate (skip it).
-- A key is owned if it was new, or if this page already owns it (a retried page must not
-- see its own keys as duplicates) and it did not appear earlier in this same call.
"""
    + _CHECK_STATE
    + """
if not intact() then
    return 'LOST'
end
local CHUNK = 1000
local page = ARGV[1]
local keys = cjson.decode(ARGV[3])
-- Owners of all the keys first, then one HSET of the new ones: a few commands per page
-- instead of one per key (the script is atomic, so nothing changes in between). Chunks
-- keep each command's arguments within Lua's stack limit.
local owners = {}
for first = 1, #keys, CHUNK do
    local last = math.min(first + CHUNK - 1, #keys)
    local got = redis.call('HMGET', KEYS[2], unpack(keys, first, last))
    for j = 1, #got do
        owners[first + j - 1] = got[j]
    end
end
local flags = {}
local earlier = {}
local claims = {}
for i = 1, #keys do
    local key = keys[i]
    local flag = '0'
    if not earlier[key] then
        earlier[key] = true
        local owner = owners[i]
        if not owner then
            claims[#claims + 1] = key
            claims[#claims + 1] = page
            flag = '1'
        elseif owner == page then
            flag = '1'
        end
    end
    flags[#flags + 1] = flag
end
for first = 1, #claims, 2 * CHUNK do
    redis.call('HSET', KEYS[2], unpack(claims, first, math.min(first + 2 * CHUNK - 1, #claims)))
end
redis.call('HINCRBY', KEYS[1], 'claims', #claims / 2)
refresh(ARGV[2])
return table.concat(flags)
"""
)

# The field order is Counts' (resources.counts.COUNT_FIELDS); a unit test keeps them equal.
RECORD_PAGE = """
-- KEYS[1] = meta key of the run: hash with 'claims' = HLEN of seen, 'pages' = HLEN of pages
-- KEYS[2] = seen key (only its TTL is refreshed here)
-- KEYS[3] = pages key of the run: hash page index -> packed counts 'source,...,failed'
-- KEYS[4] = totals key of the run: hash count field -> run total
-- ARGV[1] = page index
-- ARGV[2] = TTL in seconds, refreshed on all four keys
-- ARGV[3..8] = the page's counts: source, dispatched, skipped, rejected, completed, failed
-- returns 'LOST' if the run's state is missing or incomplete; else 'OK'.
-- The page's counts REPLACE its earlier ones: totals move by (new - old) per field, so a
-- page recorded twice (retry, re-execution) counts once.
""" + store_page_counts(keep_outcomes=False)
