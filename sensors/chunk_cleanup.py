"""When the finalizer removes the page chunks of sequential sources (``flow_assets.chunk_io``).

* once a flow run is published ``completed`` or ``partial_success``, the chunks of every
  Dagster run of its re-execution group go: nothing will re-execute from them;
* a ``failed`` or ``cancelled`` run keeps them for a re-execution from failure, until its
  group has been idle for ``FLOW_CHUNK_RETENTION_DAYS`` days (the periodic sweep).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import dagster as dg

from flow_assets.chunk_io import chunks_root, remove_run_chunks, retention_days
from resources.ledger.records import RunRow
from resources.ledger.schema import SUCCESSFUL_STATUSES
from sensors.publish import dagster_run_groups

_IN_PROGRESS = {
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
}


def remove_successful_chunks(instance: dg.DagsterInstance, published: Sequence[RunRow]) -> int:
    """Remove the chunks of the runs just published as successful (of each Dagster run of
    their groups); return how many Dagster runs had some."""
    done = [row.run_id for row in published if row.flow_status in SUCCESSFUL_STATUSES]
    if not done:
        return 0
    groups = dagster_run_groups(instance, done)
    runs = [record.dagster_run.run_id for records in groups.values() for record in records]
    return remove_run_chunks(instance, runs)


def sweep_old_chunks(instance: dg.DagsterInstance, *, now: float | None = None) -> int:
    """Remove the chunks of re-execution groups idle for longer than the retention: none of
    their Dagster runs in progress or updated since. Return how many runs' chunks went.

    A group, not a run: a re-execution from failure reads its parent's chunks."""
    cutoff = (now if now is not None else time.time()) - retention_days() * 86400
    root = chunks_root(instance)
    if not root.is_dir():
        return 0
    old = [d.name for d in root.iterdir() if d.is_dir() and d.stat().st_mtime < cutoff]
    if not old:
        return 0
    runs = {run.run_id: run for run in instance.get_runs(dg.RunsFilter(run_ids=old))}
    root_of = {run_id: _root(runs.get(run_id)) or run_id for run_id in old}
    groups = dagster_run_groups(instance, sorted(set(root_of.values())))
    busy = {
        group_root
        for group_root, records in groups.items()
        if any(_busy(record, cutoff) for record in records)
    }
    return remove_run_chunks(instance, [run_id for run_id in old if root_of[run_id] not in busy])


def _root(run: dg.DagsterRun | None) -> str | None:
    return None if run is None else run.root_run_id or run.run_id


def _busy(record: dg.RunRecord, cutoff: float) -> bool:
    updated = record.update_timestamp.timestamp() if record.update_timestamp else 0.0
    return record.dagster_run.status in _IN_PROGRESS or updated >= cutoff
