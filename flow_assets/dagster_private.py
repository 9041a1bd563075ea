"""Every use of Dagster's private API, in this one module (Dagster is pinned exactly).

Two things the public API does not offer:

- **Runless materializations in one event-log write.** ``report_runless_asset_event`` writes
  one event per call; the finalizer publishes hundreds of runs a tick, so it builds the
  same event-log entries itself (``runless_materialization_entry``) and stores them as one
  batch (``sensors.publish.store_materializations``).
- **Putting a storage's SQLAlchemy engine back.** ``optimize_for_webserver`` swaps each SQL
  storage's ``_engine`` for a pooled one and offers no way back; ``sensors.pooling`` holds
  the pooled engines for one finalizer tick only (``sql_storages``, ``set_engine``).

``tests/unit/test_dagster_private.py`` fails on a Dagster upgrade that removes or reshapes
any of it: upgrade Dagster, run that test, and adapt this module before anything else.
"""

from __future__ import annotations

import logging
from typing import Any

import dagster as dg
from dagster._core.events import StepMaterializationData
from dagster._core.instance.utils import RUNLESS_JOB_NAME, RUNLESS_RUN_ID
from sqlalchemy import Engine


def runless_materialization_entry(
    materialization: dg.AssetMaterialization, timestamp: float
) -> dg.EventLogEntry:
    """The event-log entry ``report_runless_asset_event`` stores for ``materialization``."""
    return dg.EventLogEntry(
        user_message="",
        level=logging.INFO,
        job_name=RUNLESS_JOB_NAME,
        run_id=RUNLESS_RUN_ID,
        error_info=None,
        timestamp=timestamp,
        step_key=None,
        dagster_event=dg.DagsterEvent(
            event_type_value=dg.DagsterEventType.ASSET_MATERIALIZATION.value,
            event_specific_data=StepMaterializationData(materialization),
            job_name=RUNLESS_JOB_NAME,
        ),
    )


def sql_storages(instance: dg.DagsterInstance) -> list[tuple[Any, Engine]]:
    """Each distinct storage behind the instance that holds a SQLAlchemy engine, with it.

    A ``storage: postgres`` config gives the instance dagster-postgres's run, event log and
    schedule storages directly; a ``storage: custom`` config wraps one composite storage in
    three Legacy* adapters, whose ``_storage`` attribute leads to the real storages.
    """
    found: dict[int, tuple[Any, Engine]] = {}
    for storage in (instance.run_storage, instance.event_log_storage, instance.schedule_storage):
        composite = getattr(storage, "_storage", None)
        inner = (
            [composite.run_storage, composite.event_log_storage, composite.schedule_storage]
            if composite is not None
            else []
        )
        for candidate in (storage, *inner):
            engine = getattr(candidate, "_engine", None)
            if isinstance(engine, Engine):
                found[id(candidate)] = (candidate, engine)
    return list(found.values())


def set_engine(storage: Any, engine: Engine) -> None:
    """Make ``storage`` (one of ``sql_storages``) use ``engine`` from now on."""
    storage._engine = engine
