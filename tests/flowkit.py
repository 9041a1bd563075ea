"""Helpers for Dagster-level tests: build definitions on the test's real servers, run a
flow for real, tick the real finalizer sensor, and read back what a user would see."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import dagster as dg
import redis

from flow_assets.build import build_definitions
from flow_assets.dagster_names import COUNTERS_KEY, SENSOR_NAME, STATUS_TAG, STORE_KEY
from flow_assets.flow import Flow
from flow_assets.sources.base import Page, PageRef
from resources.counts import Counts
from resources.ledger.ledger import Ledger
from resources.ledger.metrics_store import MetricsStore
from resources.ledger.records import RunRow
from resources.live.keys import ALL_RUN_KEYS_PATTERN
from resources.live.redis_counters import RedisCounters


class NoSource:
    """A source with no pages, for flows whose tests hand pages to the page step directly."""

    def plan(self, partition_key: str | None) -> list[PageRef] | None:
        return None

    def fetch(self, ref: PageRef) -> Page:
        raise NotImplementedError("NoSource has no pages; pass them to process_pages")

    def pages(self, partition_key: str | None) -> Iterator[Page]:
        return iter(())


def make_defs(flows: Sequence[Flow], redis_url: str, database_url: str) -> dg.Definitions:
    return build_definitions(
        flows,
        resources={
            STORE_KEY: MetricsStore(url=database_url),
            COUNTERS_KEY: RedisCounters(url=redis_url),
        },
    )


def run_flow(
    defs: dg.Definitions,
    flow_name: str,
    instance: dg.DagsterInstance,
    partition_key: str | None = None,
    **kwargs: Any,
) -> dg.ExecuteInProcessResult:
    job = defs.resolve_job_def(f"{flow_name}_job")
    return job.execute_in_process(
        instance=instance, partition_key=partition_key, raise_on_error=False, **kwargs
    )


def tick(defs: dg.Definitions, instance: dg.DagsterInstance) -> dg.SensorResult:
    """One real evaluation of the finalize_flow_runs sensor."""
    sensor = defs.resolve_sensor_def(SENSOR_NAME)
    with dg.build_sensor_context(instance=instance, resources=defs.resources) as context:
        result = sensor(context)
    assert isinstance(result, dg.SensorResult)
    return result


def row_of(database_url: str, run_id: str) -> RunRow:
    rows = Ledger(url=database_url).runs(run_id=run_id)
    assert len(rows) == 1, f"expected one flow_metrics row for {run_id}, got {rows}"
    return rows[0]


def assert_conserved(row: RunRow) -> None:
    counts = row.counts
    assert counts.conservation_errors() == [], counts
    if row.flow_status != "running":
        assert counts.pending == 0, f"final row {row.run_id} has pending jobs: {counts}"


def assert_counts(row: RunRow, expected: Counts) -> None:
    assert row.counts == expected, f"{row.counts} != {expected}"


def run_keys_left(redis_url: str) -> list[str]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return sorted(client.scan_iter(match=ALL_RUN_KEYS_PATTERN))
    finally:
        client.close()


def status_tag(instance: dg.DagsterInstance, run_id: str) -> str | None:
    run = instance.get_run_by_id(run_id)
    return run.tags.get(STATUS_TAG) if run else None


def latest_materialization_metadata(instance: dg.DagsterInstance, flow_name: str) -> dict[str, Any]:
    event = instance.get_latest_materialization_event(dg.AssetKey(["flows", flow_name]))
    assert event is not None and event.asset_materialization is not None
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def latest_check(instance: dg.DagsterInstance, flow_name: str) -> Any:
    check_key = dg.AssetCheckKey(dg.AssetKey(["flows", flow_name]), "flow_status")
    records = instance.event_log_storage.get_asset_check_execution_history(check_key, limit=1)
    assert records, "no flow_status check evaluation was reported"
    return records[0].event.dagster_event.event_specific_data
