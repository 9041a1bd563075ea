"""Schema versions of the metrics ledger: Alembic driven from code (no alembic.ini).

``Ledger.upgrade()`` / ``flowctl db`` run these; ``env.py`` and ``versions/`` in this
directory are Alembic's own files.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from resources.errors import ConfigurationError
from resources.ledger.db import (
    get_engine,
    new_engine,
    redacted,
    schema_ready,
    set_schema_ready,
    transaction,
)
from resources.ledger.schema import VERSION_TABLE, metadata

MIGRATIONS_DIR = Path(__file__).parent
# Serializes concurrent `upgrade` calls across processes (PostgreSQL advisory lock key).
_MIGRATION_LOCK_KEY = 0x466C6F77  # "Flow"


def migration_options() -> dict[str, Any]:
    """``MigrationContext`` options shared by env.py and the schema checks."""
    table_names = set(metadata.tables)

    def include_name(name: str | None, type_: str, _parents: dict[str, Any]) -> bool:
        # The database may be shared (e.g. with Dagster's storage): see only our tables.
        return type_ != "table" or name in table_names

    return {
        "target_metadata": metadata,
        "version_table": VERSION_TABLE,
        "render_as_batch": True,
        "compare_type": True,
        "include_name": include_name,
    }


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config built in code (no alembic.ini); env.py uses ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    config.attributes["connection"] = connection
    return config


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest migration this package ships."""
    head = _scripts().get_current_head()
    assert head is not None, "resources/ledger/migrations/versions holds no migration"
    return head


def _is_known(revision: str) -> bool:
    try:
        return _scripts().get_revision(revision) is not None
    except CommandError:
        return False


def current_revision(conn: Connection) -> str | None:
    """The revision the database is at; None when no migration ever ran."""
    context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def migrate(url: str, revision: str, *, downgrade: bool, retry_seconds: float) -> None:
    """Upgrade or downgrade the schema, serialized against other processes doing the same."""
    sqlite = make_url(url).get_backend_name() == "sqlite"
    # SQLite batch migrations drop and recreate tables: with foreign keys enforced, dropping
    # flow_metrics would cascade-delete every page row. PRAGMA foreign_keys cannot change
    # inside a transaction, so migrations use their own connection with them off.
    engine = new_engine(url, foreign_keys=False, poolclass=NullPool) if sqlite else None
    try:
        with transaction(
            engine or get_engine(url), write=True, retry_seconds=retry_seconds
        ) as conn:
            if not sqlite:
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
                )
            run = command.downgrade if downgrade else command.upgrade
            try:
                run(alembic_config(conn), revision)
            except CommandError as exc:  # unknown revision, or one on the wrong side
                verb = "downgrade" if downgrade else "upgrade"
                raise ConfigurationError(
                    f"cannot {verb} the metrics database {redacted(url)} to {revision!r}:"
                    f" {exc}. Use head, base, a revision id such as 0001, or a relative"
                    " step such as -1 (`flowctl db current` shows where it is)."
                ) from None
            if sqlite and conn.exec_driver_sql("PRAGMA foreign_key_check").first():
                raise RuntimeError(f"migration to {revision} left dangling foreign keys")
    finally:
        if engine is not None:
            engine.dispose()
        set_schema_ready(url, False)


def ensure_schema(url: str, *, auto_migrate: bool, retry_seconds: float) -> None:
    """Make sure the schema is at head, once per process and URL.

    Raises:
        ConfigurationError: the schema is behind and ``auto_migrate`` is off, or the
            database is at a revision this package does not know (a newer release).
    """
    if schema_ready(url):
        return
    with transaction(get_engine(url), write=False, retry_seconds=retry_seconds) as conn:
        current = current_revision(conn)
    head = head_revision()
    if current != head:
        if current is not None and not _is_known(current):
            raise ConfigurationError(
                f"the metrics database {redacted(url)} is at schema revision {current!r},"
                " which this version of dagster-flow-metrics does not know (it was migrated"
                " by a newer release); upgrade the package or point FLOW_DATABASE_URL elsewhere."
            )
        if not auto_migrate:
            raise ConfigurationError(
                f"the metrics database {redacted(url)} is at schema revision {current!r},"
                f" but this package needs {head!r}; run `flowctl db upgrade` (or set"
                " MetricsStore auto_migrate=True)."
            )
        migrate(url, "head", downgrade=False, retry_seconds=retry_seconds)
    set_schema_ready(url, True)
