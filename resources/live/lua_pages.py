"""Lua scripts of a page step, with their typed wrappers: claim a page, record pages.

One round trip per page, atomic on the server. The rules every run-counter script follows
(the state check, 'LOST', the TTL refresh, the hash tag) are in ``resources.live.lua``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Literal

import redis

from resources.counts import Counts
from resources.live.keys import run_keys
from resources.live.lua import Outcome, outcome, registered, reply_text

#: Claim a page's record keys; which of them the page owns.
#:
#: KEYS[1] = meta key of the run: hash with 'claims' = HLEN of seen, 'pages' = HLEN of pages
#: KEYS[2] = seen key of the run: hash record key -> index of the page that owns it
#: KEYS[3] = pages key, KEYS[4] = totals key (only their TTL is refreshed here)
#: ARGV[1] = page index
#: ARGV[2] = TTL in seconds, refreshed on all four keys
#: ARGV[3] = the page's record keys, in page order, as one JSON array of strings (one
#:   argument instead of one per key: packing a thousand arguments costs the client more
#:   than cjson costs the server)
#: Returns 'LOST' if the run's state is missing or incomplete; else a string of one flag
#: per record key, in order: '1' = owned by this page (dispatch it), '0' = duplicate (skip
#: it). A key is owned if it was new, or if this page already owns it (a retried page must
#: not see its own keys as duplicates) and it did not appear earlier in this same call.
CLAIM_PAGE = """
-- intact() and refresh(ttl): the same in every run-counter script (see resources/live/lua.py)
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


def claim_page(
    client: redis.Redis,
    flow: str,
    run_id: str,
    page_index: int,
    record_keys: Sequence[str],
    ttl: int,
) -> list[bool] | Literal[Outcome.LOST]:
    """Run CLAIM_PAGE: one flag per record key (True: the page owns it), or LOST."""
    packed = json.dumps(list(record_keys), ensure_ascii=False, separators=(",", ":"))
    script = registered(client, CLAIM_PAGE)
    flags = reply_text(script(keys=run_keys(flow, run_id), args=[page_index, ttl, packed]))
    if flags == Outcome.LOST.value:
        return Outcome.LOST
    return [flag == "1" for flag in flags]


#: Store a page's counts, replacing its earlier ones.
#:
#: KEYS[1] = meta key of the run: hash with 'claims' = HLEN of seen, 'pages' = HLEN of pages
#: KEYS[2] = seen key (only its TTL is refreshed here)
#: KEYS[3] = pages key of the run: hash page index -> packed counts 'source,...,failed'
#: KEYS[4] = totals key of the run: hash count field -> run total
#: ARGV[1] = page index
#: ARGV[2] = TTL in seconds, refreshed on all four keys
#: ARGV[3..8] = the page's counts: source, dispatched, skipped, rejected, completed, failed
#: Returns 'LOST' if the run's state is missing or incomplete; else 'DONE'.
#: The page's counts REPLACE its earlier ones: totals move by (new - old) per field, so a
#: page recorded twice (retry, re-execution) counts once. The field order is Counts'
#: (resources.counts.COUNT_FIELDS); a unit test keeps them equal.
RECORD_PAGE = """
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
    new[i] = tonumber(ARGV[2 + i])
    -- HINCRBY by 0 too, so every field of totals exists once a page is recorded.
    redis.call('HINCRBY', KEYS[4], field, new[i] - old[i])
end
redis.call('HSET', KEYS[3], ARGV[1], table.concat(new, ','))
refresh(ARGV[2])
return 'DONE'
"""


def record_pages(
    client: redis.Redis,
    flow: str,
    run_id: str,
    pages: Sequence[tuple[int, Counts]],
    ttl: int,
) -> Outcome:
    """Run RECORD_PAGE for each ``(page_index, counts)``, pipelined (one round trip).

    DONE, or LOST when Redis lost the run (a script that finds it lost writes nothing).
    """
    keys = run_keys(flow, run_id)
    script = registered(client, RECORD_PAGE)
    pipe = client.pipeline(transaction=False)
    for page_index, counts in pages:
        script(keys=keys, args=[page_index, ttl, *counts.as_tuple()], client=pipe)
    replies = [outcome(reply) for reply in pipe.execute()]
    return Outcome.LOST if Outcome.LOST in replies else Outcome.DONE
