"""Lua script of a run that became final, with its typed wrapper: forget its live state.

A run's keys go once it is published, unless a re-execution reopened it and restored its
state in the meantime (the restore marks ``meta`` with the revision it continues,
``LiveCounters.rebuild(restore_of=...)``): deleting those would take the state its steps
now use. Checking the mark and deleting in one script leaves no gap between the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from resources.live.keys import run_keys
from resources.live.lua import registered

#: Remove a final run's keys unless a re-execution restored them for this revision.
#:
#: KEYS[1..4] = the run's meta, seen, pages and totals keys
#: ARGV[1] = the revision the run was published at
#: Returns the number of keys removed: 0 if meta says 'restored_revision' = ARGV[1] (the
#: run was reopened after that finalization and its state restored: kept).
FORGET_FINAL_RUN = """
if redis.call('HGET', KEYS[1], 'restored_revision') == ARGV[1] then
    return 0
end
return redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
"""

_CHUNK = 1000  # runs per pipeline


def forget_final_runs(client: redis.Redis, runs: Sequence[tuple[str, str, int]]) -> int:
    """Run FORGET_FINAL_RUN for each ``(flow, run_id, revision)``, pipelined per chunk; the
    number of keys removed."""
    script = registered(client, FORGET_FINAL_RUN)
    removed = 0
    for start in range(0, len(runs), _CHUNK):
        pipe = client.pipeline(transaction=False)
        for flow, run_id, revision in runs[start : start + _CHUNK]:
            script(keys=run_keys(flow, run_id), args=[revision], client=pipe)
        removed += sum(int(n) for n in pipe.execute())
    return removed
