"""The code location as Dagster loads it, and partitioned flows run for real: real Dagster
definitions, executions and sensor ticks on real Redis and PostgreSQL/SQLite; nothing faked."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pytest

from flow_assets.build import build_definitions
from flow_assets.dagster_names import SENSOR_NAME
from flow_assets.flow import Flow
from flow_assets.sources.files import FileSource
from resources.counts import Counts
from tests.flowkit import assert_counts, make_defs, row_of, run_flow, run_keys_left, tick


def test_the_code_location_loads_with_jobs_assets_checks_and_a_running_sensor() -> None:
    from flow_assets.definitions import defs

    dg.Definitions.validate_loadable(defs)
    repository = defs.get_repository_def()
    assert {job.name for job in repository.get_all_jobs()} >= {
        "demo_orders_job",
        "demo_customers_job",
    }
    sensor = defs.resolve_sensor_def(SENSOR_NAME)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert dg.AssetKey(["flows", "demo_orders"]) in repository.asset_graph.get_all_asset_keys()
    check_keys = repository.asset_graph.asset_check_keys
    assert dg.AssetCheckKey(dg.AssetKey(["flows", "demo_orders"]), "flow_status") in check_keys
    assert Path("workspace.yaml").read_text().count("module_name: flow_assets.definitions") == 1


def test_finalizer_interval_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOW_FINALIZER_INTERVAL_SECONDS", "7")
    defs = build_definitions([])
    assert defs.resolve_sensor_def(SENSOR_NAME).minimum_interval_seconds == 7


def write_partition(root: Path, day: str, ids: list[int]) -> None:
    folder = root / day
    folder.mkdir(parents=True)
    with (folder / "events.jsonl").open("w") as out:
        for i in ids:
            out.write(json.dumps({"event_id": i, "day": day}) + "\n")


def test_daily_partitioned_flow_runs_each_partition_with_its_own_row(
    tmp_path: Path, redis_url: str, database_url: str, instance: dg.DagsterInstance
) -> None:
    write_partition(tmp_path, "2026-11-01", [1, 2, 3, 3])
    write_partition(tmp_path, "2026-11-02", list(range(10)))
    flow = Flow(
        name="daily_events",
        source=FileSource(str(tmp_path / "{partition}" / "events.jsonl"), page_size=3),
        key="event_id",
        handler=lambda batch: None,
        partitions=dg.DailyPartitionsDefinition(start_date="2026-11-01", end_date="2026-11-03"),
        schedule="0 3 * * *",
    )
    defs = make_defs([flow], redis_url, database_url)
    (schedule,) = defs.get_repository_def().schedule_defs
    assert schedule.name == "daily_events_schedule"
    tick_time = datetime(2026, 11, 3, 3, tzinfo=timezone.utc)
    with dg.build_schedule_context(
        instance=instance,
        scheduled_execution_time=tick_time,
        repository_def=defs.get_repository_def(),
        resources=defs.resources,  # the schedule reads the ledger (issue 10 item 8)
    ) as ctx:
        (request,) = schedule.evaluate_tick(ctx).run_requests or []
    assert (request.partition_key, request.run_key) == ("2026-11-02", "2026-11-02")

    first = run_flow(defs, "daily_events", instance, partition_key="2026-11-01")
    second = run_flow(defs, "daily_events", instance, partition_key="2026-11-02")
    tick(defs, instance)

    one, two = row_of(database_url, first.run_id), row_of(database_url, second.run_id)
    assert (one.partition_key, one.flow_status) == ("2026-11-01", "partial_success")
    assert_counts(one, Counts(source=4, dispatched=3, skipped=1, completed=3))
    assert (two.partition_key, two.flow_status) == ("2026-11-02", "completed")
    assert_counts(two, Counts(source=10, dispatched=10, completed=10))
    assert run_keys_left(redis_url) == []
    materialized = instance.get_materialized_partitions(dg.AssetKey(["flows", "daily_events"]))
    assert materialized == {"2026-11-01", "2026-11-02"}


def test_a_missing_partition_file_fails_the_run_with_the_path_in_the_reason(
    tmp_path: Path, redis_url: str, sqlite_url: str, instance: dg.DagsterInstance
) -> None:
    flow = Flow(
        name="daily_missing",
        source=FileSource(str(tmp_path / "{partition}.jsonl"), page_size=3),
        key="event_id",
        handler=lambda batch: None,
        partitions=dg.StaticPartitionsDefinition(["eu", "us"]),
    )
    defs = make_defs([flow], redis_url, sqlite_url)
    result = run_flow(defs, "daily_missing", instance, partition_key="eu")
    assert not result.success
    tick(defs, instance)
    row = row_of(sqlite_url, result.run_id)
    assert row.flow_status == "failed"
    assert "eu.jsonl" in (row.failure_reason or "")
