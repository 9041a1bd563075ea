"""Pooled Dagster storage connections for the length of one finalizer tick.

dagster-postgres opens a new connection for every storage call (SQLAlchemy NullPool), and
publishing makes two such calls per run (its check evaluation and its run tag): most of
their cost is connecting. Dagster's webserver asks for one pooled connection per storage
with ``optimize_for_webserver``; a tick does the same and, on the way out, closes the
pooled connections and puts Dagster's own engines back, so no connection outlives the
tick (the code server builds a new instance for each sensor evaluation, and nothing would
dispose the pooled engines before the garbage collector). SQLite storages are unaffected.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg
from sqlalchemy import Engine

STATEMENT_TIMEOUT_MS = 60_000  # no statement of a tick may outlast Dagster's sensor timeout
POOL_RECYCLE_S = 3600
MAX_OVERFLOW = 4


@contextmanager
def pooled_storage_connections(instance: dg.DagsterInstance) -> Iterator[None]:
    """Within the block, the instance's SQL storages reuse one pooled connection each."""
    before = {id(storage): (storage, engine) for storage, engine in _sql_storages(instance)}
    instance.optimize_for_webserver(
        statement_timeout=STATEMENT_TIMEOUT_MS,
        pool_recycle=POOL_RECYCLE_S,
        max_overflow=MAX_OVERFLOW,
    )
    try:
        yield
    finally:
        for storage, engine in _sql_storages(instance):
            original = before.get(id(storage))
            if original is not None and engine is not original[1]:
                engine.dispose()
                storage._engine = original[1]


def _sql_storages(instance: dg.DagsterInstance) -> list[tuple[Any, Engine]]:
    """Each distinct storage behind the instance that holds a SQLAlchemy engine.

    A ``storage: postgres`` config wraps one composite storage in three Legacy* adapters;
    their ``_storage`` attribute leads to the real run, event log and schedule storages.
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
