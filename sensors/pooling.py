"""Pooled Dagster storage connections for the length of one finalizer tick.

dagster-postgres opens a new connection for every storage call (SQLAlchemy NullPool), and
publishing makes two such calls per run (its check evaluation and its run tag): most of
their cost is connecting. Dagster's webserver asks for one pooled connection per storage
with ``optimize_for_webserver``; a tick does the same and, on the way out, closes the
pooled connections and puts Dagster's own engines back, so no connection outlives the
tick (the code server builds a new instance for each sensor evaluation, and nothing would
dispose the pooled engines before the garbage collector). SQLite storages are unaffected.
Finding a storage's engine and putting it back is private Dagster: ``flow_assets.dagster_private``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg

from flow_assets.dagster_private import set_engine, sql_storages

STATEMENT_TIMEOUT_MS = 60_000  # no statement of a tick may outlast Dagster's sensor timeout
POOL_RECYCLE_S = 3600
MAX_OVERFLOW = 4


@contextmanager
def pooled_storage_connections(instance: dg.DagsterInstance) -> Iterator[None]:
    """Within the block, the instance's SQL storages reuse one pooled connection each."""
    before = {id(storage): (storage, engine) for storage, engine in sql_storages(instance)}
    instance.optimize_for_webserver(
        statement_timeout=STATEMENT_TIMEOUT_MS,
        pool_recycle=POOL_RECYCLE_S,
        max_overflow=MAX_OVERFLOW,
    )
    try:
        yield
    finally:
        for storage, engine in sql_storages(instance):
            original = before.get(id(storage))
            if original is not None and engine is not original[1]:
                engine.dispose()
                set_engine(storage, original[1])
