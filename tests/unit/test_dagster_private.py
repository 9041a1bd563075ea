"""The private Dagster the package relies on (flow_assets/dagster_private.py), and Dagster's
tag names it spells itself (flow_assets/dagster_names.py), checked against the installed
Dagster. A Dagster upgrade that moves, renames or reshapes any of it fails here, naming
what changed, before it fails a finalizer tick in production.

No server: the PostgreSQL instances point at a port nothing listens on and never connect
(dagster-postgres creates its engines lazily when told not to create tables).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from sqlalchemy import Engine
from sqlalchemy.pool import NullPool

from flow_assets import dagster_names, dagster_private
from flow_assets.dagster_flow import build_flow_job
from flow_assets.dagster_private import runless_materialization_entry, set_engine, sql_storages
from flow_assets.flow import Flow
from flow_assets.sources import FileSource
from sensors.pooling import pooled_storage_connections

# Never connected to: nothing listens on port 9 of the loopback interface.
UNREACHABLE_URL = "postgresql://nobody@127.0.0.1:9/nothing"
PG_CONFIG = {"postgres_url": UNREACHABLE_URL, "should_autocreate_tables": False}
STORAGE_CONFIGS = {
    # dagster-postgres's run, event log and schedule storages, held by the instance.
    "postgres": {"postgres": PG_CONFIG},
    # One composite storage behind three Legacy* adapters (their ``_storage``).
    "custom": {
        "custom": {
            "module": "dagster_postgres",
            "class": "DagsterPostgresStorage",
            "config": PG_CONFIG,
        }
    },
}


@contextmanager
def unconnected_postgres_instance(home: Path, storage: str) -> Iterator[dg.DagsterInstance]:
    home.mkdir(parents=True, exist_ok=True)
    config = {"storage": STORAGE_CONFIGS[storage], "telemetry": {"enabled": False}}
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        yield instance


@pytest.mark.parametrize(
    ("module", "names"),
    [
        ("dagster._core.events", ["StepMaterializationData"]),
        ("dagster._core.instance.utils", ["RUNLESS_JOB_NAME", "RUNLESS_RUN_ID"]),
    ],
)
def test_the_private_names_still_exist(module: str, names: list[str]) -> None:
    imported = importlib.import_module(module)
    missing = [name for name in names if not hasattr(imported, name)]
    assert not missing, f"Dagster no longer has {module}.{missing}: adapt dagster_private.py"


def test_a_batched_runless_materialization_is_what_dagster_itself_writes() -> None:
    materialization = dg.AssetMaterialization(
        asset_key=dagster_names.flow_asset_key("orders"),
        partition="2026-01-05",
        metadata={"flow_status": "completed", "dispatched_jobs": 10},
        tags={dagster_names.STATUS_TAG: "completed"},
    )
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(materialization)
        written = instance.get_latest_materialization_event(materialization.asset_key)
        assert written is not None

        ours = runless_materialization_entry(materialization, written.timestamp)
        assert ours == written, "report_runless_asset_event writes another entry now"

        instance.event_log_storage.store_event_batch([ours._replace(timestamp=time.time())])
        records = instance.fetch_materializations(materialization.asset_key, limit=10).records
        assert len(records) == 2
        assert records[0].event_log_entry.asset_materialization == materialization


@pytest.mark.parametrize("storage", sorted(STORAGE_CONFIGS))
def test_each_sql_storage_holds_the_engine_pooling_swaps(tmp_path: Path, storage: str) -> None:
    with unconnected_postgres_instance(tmp_path / "home", storage) as instance:
        found = sql_storages(instance)
        kinds = sorted(type(storage).__name__ for storage, _ in found)
        assert kinds == [
            "PostgresEventLogStorage",
            "PostgresRunStorage",
            "PostgresScheduleStorage",
        ], f"the instance's SQL storages are no longer reachable as they were: {kinds}"
        assert all(isinstance(engine.pool, NullPool) for _, engine in found)

        # What pooling relies on: optimize_for_webserver replaces each storage's _engine
        # with a pooled one, and an engine set back is the one the storage uses.
        instance.optimize_for_webserver(statement_timeout=1000, pool_recycle=60, max_overflow=1)
        pooled = dict(_by_storage(sql_storages(instance)))
        for candidate, engine in found:
            assert pooled[id(candidate)] is not engine, "optimize_for_webserver kept the engine"
            assert not isinstance(pooled[id(candidate)].pool, NullPool)
            set_engine(candidate, engine)
        assert dict(_by_storage(sql_storages(instance))) == dict(_by_storage(found))


@pytest.mark.parametrize("storage", sorted(STORAGE_CONFIGS))
def test_pooled_connections_put_dagsters_engines_back(tmp_path: Path, storage: str) -> None:
    with unconnected_postgres_instance(tmp_path / "home", storage) as instance:
        before = dict(_by_storage(sql_storages(instance)))
        with pooled_storage_connections(instance):
            inside = dict(_by_storage(sql_storages(instance)))
        after = dict(_by_storage(sql_storages(instance)))
    assert len(before) == 3  # run, event log and schedule storage
    assert all(inside[key] is not engine for key, engine in before.items())
    assert after == before


def test_dagsters_tags_are_spelled_as_dagster_spells_them() -> None:
    tags = importlib.import_module("dagster._core.storage.tags")
    assert dagster_names.DAGSTER_TAG_PREFIX == tags.SYSTEM_TAG_PREFIX
    assert dagster_names.ROOT_RUN_ID_TAG == tags.ROOT_RUN_ID_TAG
    assert dagster_names.PARENT_RUN_ID_TAG == tags.PARENT_RUN_ID_TAG
    assert dagster_names.PARTITION_TAG == tags.PARTITION_NAME_TAG
    assert dagster_names.REPOSITORY_LABEL_TAG == tags.REPOSITORY_LABEL_TAG


def test_ops_take_the_resources_under_the_keys_user_definitions_use(tmp_path: Path) -> None:
    """Dagster matches a typed resource parameter to the resource of the same key: the
    ops' parameter names are the keys users override (``STORE_KEY``, ``COUNTERS_KEY``)."""
    flow = Flow(
        name="orders",
        source=FileSource(str(tmp_path / "orders.jsonl"), page_size=10),
        key="id",
        handler=lambda batch: None,
    )
    job = build_flow_job(flow)
    keys = {
        op.name: set(op.required_resource_keys)
        for op in job.graph.node_defs
        if isinstance(op, dg.OpDefinition)
    }
    expected = {dagster_names.STORE_KEY, dagster_names.COUNTERS_KEY}
    assert keys == {f"orders_{op}": expected for op in ("plan", "pages", "collect")}
    assert job.name == dagster_names.job_name("orders") == "orders_job"


def test_the_module_is_the_only_private_user() -> None:
    """Private Dagster is imported by flow_assets/dagster_private.py and nowhere else."""
    root = Path(__file__).resolve().parents[2]
    offenders = [
        str(path.relative_to(root))
        for package in ("flow_assets", "resources", "sensors")
        for path in sorted((root / package).rglob("*.py"))
        if path.name != Path(dagster_private.__file__).name
        and any(
            marker in path.read_text(encoding="utf-8")
            for marker in ("dagster._", "._engine", "._storage", "._instance")
        )
    ]
    assert offenders == [], (
        f"private Dagster outside flow_assets/dagster_private.py: {offenders}; move it there"
        " (a Dagster tag's name goes to flow_assets/dagster_names.py, checked above)"
    )


def _by_storage(pairs: list[tuple[Any, Engine]]) -> list[tuple[int, Engine]]:
    return [(id(storage), engine) for storage, engine in pairs]
