"""Show final flow runs in Dagster: asset metadata, an asset check, a run tag; drop Redis keys.

Runs are published after their final write and marked published afterwards, so a crash
in between publishes again on the next tick (at-least-once for UI events; the ledger's
final state itself is written exactly once).
"""

from __future__ import annotations

import logging
from datetime import datetime

import dagster as dg

from resources.errors import CountersUnavailableError
from resources.metrics_store import MetricsStore, RunRow
from resources.redis_counters import RedisCounters

log = logging.getLogger(__name__)
STATUS_TAG = "flow/status"
STATUS_CHECK = "flow_status"
_SEVERITY = {
    "partial_success": dg.AssetCheckSeverity.WARN,
    "cancelled": dg.AssetCheckSeverity.WARN,
    "failed": dg.AssetCheckSeverity.ERROR,
}


def flow_asset_key(flow_name: str) -> dg.AssetKey:
    return dg.AssetKey(["flows", flow_name])


def publish_final_runs(
    instance: dg.DagsterInstance,
    store: MetricsStore,
    counters: RedisCounters,
    now: datetime,
    limit: int,
) -> list[str]:
    """Publish up to ``limit`` final, unpublished runs; return their run ids."""
    rows = store.unpublished_runs(limit)
    known_runs = (
        {
            run.run_id
            for run in instance.get_runs(dg.RunsFilter(run_ids=[row.run_id for row in rows]))
        }
        if rows
        else set()
    )
    for row in rows:
        for event in final_events(row):
            instance.report_runless_asset_event(event)
        if row.run_id in known_runs:
            instance.add_run_tags(row.run_id, {STATUS_TAG: row.flow_status})
        _forget_run_keys(counters, row)
    if rows:
        store.mark_published([row.run_id for row in rows], now)
    return [row.run_id for row in rows]


def _forget_run_keys(counters: RedisCounters, row: RunRow) -> None:
    try:
        counters.delete_run(row.flow_name, row.run_id)
    except CountersUnavailableError as exc:
        # The keys expire by their TTL, and `flowctl cleanup` / the sensor's periodic
        # cleanup remove them once Redis is back; publishing does not wait for Redis.
        log.warning(
            "flow %s run %s: could not delete its Redis keys: %s", row.flow_name, row.run_id, exc
        )


def final_events(row: RunRow) -> list[dg.AssetMaterialization | dg.AssetCheckEvaluation]:
    """The materialization (numeric metadata, plotted by the UI) and check of a final run."""
    key = flow_asset_key(row.flow_name)
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
    }
    if row.failure_reason:
        metadata["failure_reason"] = row.failure_reason
    check = dg.AssetCheckEvaluation(
        asset_key=key,
        check_name=STATUS_CHECK,
        passed=row.flow_status == "completed",
        severity=_SEVERITY.get(row.flow_status, dg.AssetCheckSeverity.WARN),
        description=f"run {row.run_id}: {row.flow_status}"
        + (f" ({row.failure_reason})" if row.failure_reason else ""),
        # Not a partitioned evaluation: Dagster keeps one runless evaluation per partition,
        # so a second run of the same partition could not be reported. The partition is
        # in the metadata and on the materialization.
        metadata={
            "run_id": row.run_id,
            "flow_status": row.flow_status,
            "partition": row.partition_key or "",
        },
    )
    materialization = dg.AssetMaterialization(
        asset_key=key,
        partition=row.partition_key,
        description=f"flow {row.flow_name} run {row.run_id}: {row.flow_status}",
        metadata=metadata,
        tags={STATUS_TAG: row.flow_status},
    )
    return [materialization, check]
