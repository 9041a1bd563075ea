"""Redis key names. Every run-scoped key is ``flow:{<flow_name>:<run_id>}:<kind>``.

The braces are a Redis Cluster hash tag: all keys of a run hash to one slot, so the
multi-key Lua scripts also work on a cluster.
"""

from __future__ import annotations

import re

from resources.names import validate_name

#: The kinds of run-scoped key. ``meta`` marks the run's state as present (its loss
#: means Redis lost the run), ``seen`` maps record key -> owning page, ``pages`` maps
#: page index -> that page's packed counts, ``totals`` holds the live run totals.
KINDS: tuple[str, ...] = ("meta", "seen", "pages", "totals")

_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def run_key(flow_name: str, run_id: str, kind: str) -> str:
    """The key of one kind of state of one run."""
    if kind not in KINDS:
        raise ValueError(f"unknown key kind {kind!r}; expected one of {KINDS}")
    return f"{run_prefix(flow_name, run_id)}{kind}"


def run_keys(flow_name: str, run_id: str) -> list[str]:
    """All keys a run may own, in ``KINDS`` order."""
    prefix = run_prefix(flow_name, run_id)
    return [f"{prefix}{kind}" for kind in KINDS]


def run_prefix(flow_name: str, run_id: str) -> str:
    validate_name(flow_name, "flow name")
    if not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"run id {run_id!r} is not a Dagster run id (letters, digits, '-', '_')")
    return f"flow:{{{flow_name}:{run_id}}}:"


#: SCAN pattern over every run-scoped key of this package. Safe because flow names and
#: run ids cannot hold pattern characters.
ALL_RUN_KEYS_PATTERN = "flow:{*}:*"


def parse_run_key(key: str) -> tuple[str, str, str] | None:
    """``(flow_name, run_id, kind)`` of a run-scoped key, or None for any other key."""
    match = re.fullmatch(r"flow:\{([a-z][a-z0-9_]*):([A-Za-z0-9_-]+)\}:([a-z]+)", key)
    return (match[1], match[2], match[3]) if match else None
