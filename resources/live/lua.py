"""What the Lua script modules share: the answer type of their wrappers and one registration.

The scripts live next to their typed wrappers, one module per concern:

- ``resources.live.lua_pages``: a page step claims a page's record keys and records its counts;
- ``resources.live.lua_rq``: pages whose jobs go to RQ workers (dispatch="rq"): the page's
  counts at dispatch, the workers' acks, and the removal of a final run's queued jobs;
- ``resources.live.lua_final``: a published run's keys removed, unless a re-execution has
  restored them since.

Every script is a literal module constant, its KEYS/ARGV/return contract in the comment
right above it. The run-counter scripts share these rules:

- KEYS[1..4] are the run's ``meta``, ``seen``, ``pages`` and ``totals`` keys
  (``resources.live.keys.run_keys``). They share the run's hash tag, so the scripts also run on
  Redis Cluster.
- First they check the run's state: ``meta`` must exist and agree with the sizes of
  ``seen`` and ``pages`` (meta keeps how many fields each should hold). When it does not,
  Redis has lost the run or part of it (restart, eviction, FLUSHALL, expiry) and writing
  anything would count from a wrong base: the script writes nothing and returns 'LOST';
  the caller rebuilds the run from the SQL ledger and calls again.
- Every write refreshes the TTL of all four keys, so they expire together.
- The helpers ``intact()``, ``refresh(ttl)`` and ``unpack_counts(packed)`` are written
  out in each script that uses them, so that each script reads on its own; a unit test
  (tests/services/test_live_counters.py) keeps the copies identical.

Scripts are registered with :func:`registered`: one ``redis.commands.core.Script`` per
client and script, created on first use. A Script is bound to the client that registered
it (it encodes with that client's encoder); it may be called on a pipeline of that client,
and reloads itself after NOSCRIPT (``SCRIPT FLUSH``, a restart, a failover), so callers
never see that error.
"""

from __future__ import annotations

import enum
import threading
import weakref

import redis
from redis.commands.core import Script


class Outcome(enum.Enum):
    """What a script did to a run's live counters: the answer of every script wrapper.

    The values are the scripts' own replies.
    """

    LOST = "LOST"  # Redis has no whole state for the run: nothing written; rebuild, call again
    NOOP = "NOOP"  # nothing to apply, or refused by the script's guard: nothing written
    DONE = "DONE"  # applied (for an ack: jobs of the run are still pending)
    ZERO = "ZERO"  # an ack applied, and no job of the run is pending any more
    # Not a script's answer: an RQ ack of a run that was final when it came. Its outcome is
    # recorded as late in the ledger (job_queries.record_late), never counted; Redis is not
    # touched (see flow_assets.rq.worker.acknowledge).
    LATE = "LATE"


# client -> script source -> that client's Script. Weak: a client dropped by its owner
# takes its Scripts with it.
_SCRIPTS: weakref.WeakKeyDictionary[redis.Redis, dict[str, Script]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def registered(client: redis.Redis, source: str) -> Script:
    """``client``'s Script for ``source``, registered once (``register_script``).

    Call it with ``client=<a pipeline of client>`` to queue it in that pipeline.
    """
    with _LOCK:
        scripts = _SCRIPTS.get(client)
        if scripts is None:
            scripts = _SCRIPTS[client] = {}
        script = scripts.get(source)
        if script is None:
            script = scripts[source] = client.register_script(source)
    return script


def reply_text(reply: object) -> str:
    """A script's string reply as text, from a client with or without decoded responses."""
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def outcome(reply: object) -> Outcome:
    """A script's reply (one of ``Outcome``'s values) as an ``Outcome``."""
    return Outcome(reply_text(reply))
