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

    @property
    def removable(self) -> bool:
        return self.flow_status is not None


def find_stray_runs(store: Ledger, counters: LiveCounters) -> list[StrayRun]:
    """Runs with Redis keys whose ledger row is final, or missing."""
    pairs = counters.stray_runs()
    found = store.statuses([run_id for _, run_id in pairs])
    statuses = {run_id: status for run_id, (status, _) in found.items()}
    return [
        StrayRun(flow_name, run_id, statuses.get(run_id))
        for flow_name, run_id in pairs
        if statuses.get(run_id) != "running"
    ]


def remove_stray_keys(
    store: Ledger, counters: LiveCounters, *, dry_run: bool = False
) -> list[StrayRun]:
    """Delete the keys of every stray run whose ledger row is final; return what was found."""
    strays = find_stray_runs(store, counters)
    if not dry_run:
        for stray in strays:
            if stray.removable:
                counters.delete_run(stray.flow_name, stray.run_id)
    return strays
