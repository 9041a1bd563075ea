"""Find and remove Redis keys left behind by finished runs (a crash between steps, a page
step that outlived its run's finalization). Keys of runs the ledger does not know are
reported but kept: they may belong to another deployment sharing the Redis server."""

from __future__ import annotations

from dataclasses import dataclass

from resources.ledger.ledger import Ledger
from resources.live.counters import LiveCounters


@dataclass(frozen=True)
class StrayRun:
    """A run that still has keys in Redis although it is not running."""

    flow_name: str
    run_id: str
    flow_status: str | None  # None: the ledger has no such run
    revision: int = 0  # of its final row

    @property
    def removable(self) -> bool:
        return self.flow_status is not None


def find_stray_runs(store: Ledger, counters: LiveCounters) -> list[StrayRun]:
    """Runs with Redis keys whose ledger row is final, or missing."""
    pairs = counters.stray_runs()
    found = store.statuses([run_id for _, run_id in pairs])
    return [
        StrayRun(flow_name, run_id, *found.get(run_id, (None, 0)))
        for flow_name, run_id in pairs
        if found.get(run_id, (None, 0))[0] != "running"
    ]


def remove_stray_keys(
    store: Ledger, counters: LiveCounters, *, dry_run: bool = False
) -> list[StrayRun]:
    """Delete the keys of every stray run whose ledger row is final, as publishing does
    (kept if a re-execution reopened the run and restored them meanwhile), in one round
    trip per thousand runs; return what was found."""
    strays = find_stray_runs(store, counters)
    if not dry_run:
        finals = [(s.flow_name, s.run_id, s.revision) for s in strays if s.removable]
        counters.forget_final_runs(finals)
    return strays
