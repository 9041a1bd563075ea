"""Show final flow runs in Dagster: asset metadata, an asset check, a run tag; drop Redis keys.

Runs are published after their final write and marked published afterwards, so a crash
in between publishes again on the next tick (at-least-once for UI events; the ledger's
final state itself is written exactly once). ``dagster_run_groups`` (the Dagster runs of
each flow run's re-execution group) also serves the finalizer and the sensor.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime

import dagster as dg

from flow_assets.dagster_names import ROOT_RUN_ID_TAG, STATUS_CHECK, STATUS_TAG, flow_asset_key
from flow_assets.dagster_private import runless_materialization_entry
from resources.errors import CountersUnavailableError
from resources.ledger.ledger import Ledger
from resources.ledger.records import RunRow
from resources.live.counters import LiveCounters
from resources.redaction import redact_text

log = logging.getLogger(__name__)
PUBLISH_CHUNK = 250  # runs per event-log batch and per mark_published (about 1 s)
_SEVERITY = {
    "partial_success": dg.AssetCheckSeverity.WARN,
    "cancelled": dg.AssetCheckSeverity.WARN,
    "failed": dg.AssetCheckSeverity.ERROR,
}


def publish_final_runs(
    instance: dg.DagsterInstance,
    store: Ledger,
    counters: LiveCounters,
    now: datetime,
    limit: int,
    *,
    until: float | None = None,
) -> list[RunRow]:
    """Publish up to ``limit`` final, unpublished runs; return their rows as published.

    Runs go out in chunks of ``PUBLISH_CHUNK``, each marked published once done. After
    the first chunk, none starts past ``until`` (a ``time.monotonic()`` value; None: no
    limit), so a large backlog spreads over several ticks instead of running into
    Dagster's sensor timeout.
    """
    published: list[RunRow] = []
    rows = store.unpublished_runs(limit)
    for start in range(0, len(rows), PUBLISH_CHUNK):
        if start and until is not None and time.monotonic() >= until:
            break  # the first chunk always goes: every call makes progress
        chunk = _still_final(store, rows[start : start + PUBLISH_CHUNK])
        groups = dagster_run_groups(instance, [row.run_id for row in chunk])
        _publish_chunk(instance, groups, chunk)
        # A row reopened or finalized again meanwhile stays unpublished (its new revision
        # goes out next) and keeps its Redis keys, which its steps use again.
        marked = set(store.mark_published(chunk, now))
        done = [row for row in chunk if row.run_id in marked]
        _forget_run_keys(counters, done)
        _retag_reopened(instance, store, groups, [row for row in chunk if row not in done])
        published.extend(done)
    return published


def _still_final(store: Ledger, rows: Sequence[RunRow]) -> list[RunRow]:
    """The rows whose run is still as read (status and revision): one reopened meanwhile (a
    re-execution), or reopened and finalized again, is neither shown with the old row's
    status and counts nor stripped of the Redis keys its steps now use."""
    current = store.statuses([row.run_id for row in rows])
    return [row for row in rows if current.get(row.run_id) == (row.flow_status, row.revision)]


def _publish_chunk(
    instance: dg.DagsterInstance,
    groups: Mapping[str, list[dg.RunRecord]],
    rows: Sequence[RunRow],
) -> None:
    by_flow: dict[str, list[RunRow]] = defaultdict(list)
    for row in rows:
        by_flow[row.flow_name].append(row)
    for flow_rows in by_flow.values():
        store_materializations(instance, [final_materialization(row) for row in flow_rows])
    for row in rows:
        instance.report_runless_asset_event(final_check(row))
        tag_group(instance, groups, row.run_id, row.flow_status)


def tag_group(
    instance: dg.DagsterInstance, groups: Mapping[str, list[dg.RunRecord]], run_id: str, status: str
) -> None:
    """Every Dagster run of the group shows the flow run's current status: a re-execution
    inherits its parent's tags, a parent keeps an older verdict."""
    for record in groups.get(run_id, ()):
        instance.add_run_tags(record.dagster_run.run_id, {STATUS_TAG: status})


def _retag_reopened(
    instance: dg.DagsterInstance,
    store: Ledger,
    groups: Mapping[str, list[dg.RunRecord]],
    rows: Sequence[RunRow],
) -> None:
    """Rows reopened while they were published: their re-execution tagged the group
    ``running``, which the tags just written may have overwritten."""
    current = store.statuses([row.run_id for row in rows]) if rows else {}
    for run_id, (status, _) in current.items():
        if status == "running":
            tag_group(instance, groups, run_id, status)


def dagster_run_groups(
    instance: dg.DagsterInstance, run_ids: list[str]
) -> dict[str, list[dg.RunRecord]]:
    """Flow run id -> the Dagster runs of its re-execution group in this instance, newest
    first: the run itself (the group's root) and every run tagged with it as root."""
    children = instance.get_run_records(dg.RunsFilter(tags={ROOT_RUN_ID_TAG: run_ids}))
    roots = instance.get_run_records(dg.RunsFilter(run_ids=run_ids))
    groups: dict[str, list[dg.RunRecord]] = {}
    seen: set[str] = set()
    for record in [*children, *roots]:
        run = record.dagster_run
        if run.run_id in seen:
            continue
        seen.add(run.run_id)
        groups.setdefault(run.root_run_id or run.run_id, []).append(record)
    for records in groups.values():
        records.sort(key=lambda record: record.create_timestamp, reverse=True)
    return groups


def store_materializations(
    instance: dg.DagsterInstance, materializations: Sequence[dg.AssetMaterialization]
) -> None:
    """Report runless materializations of ONE asset key in one event-log write.

    What ``report_runless_asset_event`` stores for each, written as a batch: the
    PostgreSQL event log inserts a batch in one statement (one connection instead of two
    per event); other storages store the events one by one. One asset key per call,
    because a PostgreSQL batch updates the asset's latest-materialization row from the
    batch's last event only.
    """
    keys = {materialization.asset_key for materialization in materializations}
    if len(keys) > 1:
        raise ValueError(f"one asset key per batch, got {sorted(k.to_string() for k in keys)}")
    timestamp = time.time()
    entries = [
        runless_materialization_entry(materialization, timestamp)
        for materialization in materializations
    ]
    if entries:
        instance.event_log_storage.store_event_batch(entries)


def _forget_run_keys(counters: LiveCounters, rows: Sequence[RunRow]) -> None:
    try:
        counters.forget_final_runs([(row.flow_name, row.run_id, row.revision) for row in rows])
    except CountersUnavailableError as exc:
        # The keys expire by their TTL, and `flowctl cleanup` / the sensor's periodic
        # cleanup remove them once Redis is back; publishing does not wait for Redis.
        log.warning(
            "could not delete the Redis keys of %d final runs: %s", len(rows), redact_text(str(exc))
        )


def final_materialization(row: RunRow) -> dg.AssetMaterialization:
    """A final run's counts as materialization metadata (numeric: plotted by the UI)."""
    metadata: dict[str, dg.RawMetadataValue] = {
        "flow_status": row.flow_status,
        "source_record_count": row.source_record_count,
        "dispatched_jobs": row.dispatched_jobs,
        "skipped_records": row.skipped_records,
        "rejected_records": row.rejected_records,
        "completed_jobs": row.completed_jobs,
        "failed_jobs": row.failed_jobs,
        "pages_done": row.pages_done,
        "total_runtime_ms": row.total_runtime_ms or 0,
        "dagster_run": dg.MetadataValue.dagster_run(row.run_id),
        # A re-executed (or late-succeeding) run is finalized again: the same flow run,
        # a new revision, so plots and history can tell it from a new run.
        "flow_run_id": row.run_id,
        "flow_run_revision": row.revision,
    }
    if row.failure_reason:
        # Redacted when written; again here, as every outward text is (older rows too).
        metadata["failure_reason"] = redact_text(row.failure_reason)
    revision = f" (revision {row.revision})" if row.revision > 1 else ""
    return dg.AssetMaterialization(
        asset_key=flow_asset_key(row.flow_name),
        partition=row.partition_key,
        description=f"flow {row.flow_name} run {row.run_id}{revision}: {row.flow_status}",
        metadata=metadata,
        tags={STATUS_TAG: row.flow_status},
    )


def final_check(row: RunRow) -> dg.AssetCheckEvaluation:
    """A final run's status as the flow_status check: WARN on partial_success, ERROR on failed."""
    return dg.AssetCheckEvaluation(
        asset_key=flow_asset_key(row.flow_name),
        check_name=STATUS_CHECK,
        passed=row.flow_status == "completed",
        severity=_SEVERITY.get(row.flow_status, dg.AssetCheckSeverity.WARN),
        description=f"run {row.run_id}: {row.flow_status}"
        + (f" ({redact_text(row.failure_reason)})" if row.failure_reason else ""),
        # Not a partitioned evaluation: Dagster keeps one runless evaluation per partition,
        # so a second run of the same partition could not be reported. The partition is
        # in the metadata and on the materialization.
        metadata={
            "run_id": row.run_id,
            "flow_status": row.flow_status,
            "partition": row.partition_key or "",
        },
    )
