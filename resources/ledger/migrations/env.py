"""Alembic environment of the metrics ledger.

``resources.ledger.migrations.migrate`` hands in an open connection (already inside a
locked transaction) through ``config.attributes["connection"]``. Without one (a developer
running the ``alembic`` CLI, or ``--sql`` offline mode) the URL comes from
``sqlalchemy.url`` or the same settings as ``MetricsStore``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from resources.ledger.db import resolve_url
from resources.ledger.migrations import migration_options

config = context.config


def _url() -> str:
    return resolve_url(config.get_main_option("sqlalchemy.url"))


def run_migrations_offline() -> None:
    """Print the SQL instead of running it."""
    context.configure(url=_url(), literal_binds=True, **migration_options())
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run against the given connection, or a fresh one to the configured database."""
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, **migration_options())
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(_url(), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, **migration_options())
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
