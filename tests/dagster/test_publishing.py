"""Publishing final runs to Dagster in batches: materializations, checks, run tags, Redis
keys. On a real PostgreSQL Dagster instance (dagster-postgres, whose batch event write and
per-call connections this code works around) and on the SQLite test instance; real Redis,
a real SQLite ledger. Nothing is faked."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import dagster as dg
import psycopg
import pytest
from sqlalchemy.pool import NullPool

from devservers import PostgresServer
from flow_assets.dagster_private import sql_storages as _sql_storages
from resources.counts import Counts
from resources.ledger.ledger import Ledger
from resources.live.counters import LiveCounters
from sensors import publish
from sensors.finalizer import finalize_runs
from sensors.pooling import pooled_storage_connections
from sensors.publish import publish_final_runs, store_materializations
from tests.flowkit import run_keys_left, status_tag
from tests.ledger_helpers import finalize

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)
# flow -> the final statuses of its runs, in the order they finish.
RUNS = {
    "orders": ["completed", "partial_success", "failed"],
    "customers": ["completed", "cancelled"],
}


def seed_final_runs(
    instance: dg.DagsterInstance, store: Ledger, counters: LiveCounters
) -> dict[str, list[str]]:
    """Final, unpublished runs of two flows, interleaved in finish order; their Dagster
    run records and Redis keys exist. Returns flow -> run ids in finish order."""
    run_ids: dict[str, list[str]] = {flow: [] for flow in RUNS}
    minute = 0
    for n in range(max(len(statuses) for statuses in RUNS.values())):
        for flow, statuses in RUNS.items():
            if n >= len(statuses):
                continue
            run_id = f"{flow}-run-{n}"
            store.start_run(run_id, flow, None, T0)
            counters.start_run(flow, run_id)
            instance.add_run(dg.DagsterRun(job_name=f"{flow}_job", run_id=run_id))
            minute += 1
            counts = Counts(source=10, dispatched=10, completed=10 - n, failed=n)
            finalize(
                store,
                run_id,
                status=statuses[n],
                counts=counts,
                pages_done=1,
                finished_at=T0 + timedelta(minutes=minute),
            )
            run_ids[flow].append(run_id)
    return run_ids


@pytest.fixture(params=["instance", "postgres_instance"])
def any_instance(request: pytest.FixtureRequest) -> dg.DagsterInstance:
    """The SQLite test instance, then a PostgreSQL one."""
    return request.getfixturevalue(request.param)


def test_a_batch_of_two_flows_publishes_every_run_and_the_right_latest_per_flow(
    any_instance: dg.DagsterInstance, sqlite_url: str, redis_url: str
) -> None:
    store, counters = Ledger(url=sqlite_url), LiveCounters(url=redis_url)
    run_ids = seed_final_runs(any_instance, store, counters)

    with pooled_storage_connections(any_instance):
        published = publish_final_runs(any_instance, store, counters, T0, limit=100)

    assert sorted(row.run_id for row in published) == sorted(
        r for runs in run_ids.values() for r in runs
    )
    assert store.unpublished_runs(100) == []
    assert run_keys_left(redis_url) == []
    for flow, statuses in RUNS.items():
        key = dg.AssetKey(["flows", flow])
        records = any_instance.fetch_materializations(key, limit=100).records
        assert len(records) == len(statuses)
        # One batch holds both flows: each flow's latest materialization must be its own
        # last run (PostgreSQL's batch write updates the asset row from its last event).
        latest = any_instance.get_latest_materialization_event(key)
        assert latest is not None and latest.asset_materialization is not None
        metadata = latest.asset_materialization.metadata
        assert metadata["dagster_run"].value == run_ids[flow][-1]
        assert metadata["flow_status"].value == statuses[-1]
        check_key = dg.AssetCheckKey(key, publish.STATUS_CHECK)
        history = any_instance.event_log_storage.get_asset_check_execution_history(
            check_key, limit=100
        )
        checked = [h.event.dagster_event.event_specific_data for h in history]
        assert sorted(c.metadata["run_id"].value for c in checked) == sorted(run_ids[flow])
        for run_id, status in zip(run_ids[flow], statuses, strict=True):
            assert status_tag(any_instance, run_id) == status


def test_materializations_of_two_assets_are_refused_in_one_batch(
    instance: dg.DagsterInstance,
) -> None:
    mixed = [dg.AssetMaterialization(["flows", "a"]), dg.AssetMaterialization(["flows", "b"])]
    with pytest.raises(ValueError, match="one asset key per batch"):
        store_materializations(instance, mixed)
    assert instance.get_latest_materialization_event(dg.AssetKey(["flows", "a"])) is None


def test_publishing_past_its_budget_leaves_the_rest_for_the_next_call(
    instance: dg.DagsterInstance, sqlite_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publish, "PUBLISH_CHUNK", 2)
    store, counters = Ledger(url=sqlite_url), LiveCounters(url=redis_url)
    run_ids = seed_final_runs(instance, store, counters)
    oldest_first = [row.run_id for row in store.unpublished_runs(100)]

    # A finalizer pass whose time budget is spent before it publishes anything.
    first = finalize_runs(instance, store, counters, {}, time_budget_seconds=0).published
    rest = publish_final_runs(instance, store, counters, T0, limit=100, until=None)

    assert [row.run_id for row in first] == oldest_first[:2]  # one chunk starts, however late
    assert [row.run_id for row in rest] == oldest_first[2:]
    assert len(first + rest) == sum(len(runs) for runs in run_ids.values())
    assert store.unpublished_runs(100) == []


def _connections_to_dagster_db(postgres_server: PostgresServer) -> int:
    with psycopg.connect(
        postgres_server.admin_url.replace("postgresql+psycopg://", "postgresql://", 1),
        autocommit=True,
    ) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname LIKE 'dagster\\_%'"
        ).fetchone()
    return int(row[0]) if row else -1


def test_pooled_connections_last_only_for_the_block(
    postgres_instance: dg.DagsterInstance, postgres_server: PostgresServer
) -> None:
    storages = _sql_storages(postgres_instance)
    assert len(storages) == 3  # run, event log and schedule storage
    assert all(isinstance(engine.pool, NullPool) for _, engine in storages)

    with pooled_storage_connections(postgres_instance):
        for _ in range(3):
            postgres_instance.get_run_ids(limit=1)
            postgres_instance.report_runless_asset_event(dg.AssetMaterialization("x"))
        pooled = _sql_storages(postgres_instance)
        held_inside = _connections_to_dagster_db(postgres_server)

    assert not any(isinstance(engine.pool, NullPool) for _, engine in pooled)
    assert 1 <= held_inside <= len(storages)  # reused, not one per call
    assert _connections_to_dagster_db(postgres_server) == 0
    assert [engine for _, engine in _sql_storages(postgres_instance)] == [
        engine for _, engine in storages
    ]
    assert postgres_instance.get_latest_materialization_event(dg.AssetKey("x")) is not None
