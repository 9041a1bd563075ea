"""A failed ledger statement shows no record data (review 12, finding 2b).

SQLAlchemy's errors quote the statement and its parameters (a page's ``claimed_keys``: record
keys, often emails), and Dagster stores an exception's ``__cause__`` and ``__context__`` in
the step failure. The ledger therefore raises its own errors, driver message redacted and
masked, chained to nothing. Real PostgreSQL and SQLite (tests/conftest.py); nothing faked.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from resources.counts import Counts
from resources.errors import StoreError, StoreUnavailableError
from resources.ledger import db
from resources.ledger.ledger import Ledger
from resources.ledger.records import PageRecord

pytestmark = pytest.mark.services

T0 = datetime(2025, 1, 6, 12, 0, tzinfo=timezone.utc)
EMAIL = "alice.liddell@example.com"
KEYS = [EMAIL, "bob.sleigh@example.com"]


def page(keys: list[str]) -> PageRecord:
    return PageRecord(0, Counts(source=len(keys), dispatched=len(keys)), "dispatched", keys, [])


def assert_shows_no_record(error: BaseException) -> None:
    """Neither the error nor anything chained to it quotes a record key or parameters."""
    assert error.__cause__ is None and error.__context__ is None
    shown = "".join(traceback.format_exception(error)) + repr(error.args)
    assert "@example.com" not in shown
    assert "[parameters" not in shown and "[SQL" not in shown


@pytest.fixture
def admin(postgres_url: str) -> Iterator[sa.Engine]:
    """A connection pool of the test's own, outside the ledger's engines."""
    engine = sa.create_engine(postgres_url)
    yield engine
    engine.dispose()


def test_a_lock_timeout_while_recording_pages_quotes_no_record_key(
    postgres_url: str, admin: sa.Engine
) -> None:
    """An operator's ``lock_timeout`` (common in production) fires while another session holds
    the run's row: the page write fails as a StoreError naming the driver's error, with no
    key, and the same write succeeds once the lock is gone (nothing half-written)."""
    database = make_url(postgres_url).database
    with admin.begin() as conn:
        conn.execute(sa.text(f"ALTER DATABASE \"{database}\" SET lock_timeout = '300ms'"))
    store = Ledger(url=postgres_url)
    store.start_run("run-1", "orders", None, T0)
    with admin.connect() as holder, holder.begin():
        holder.execute(sa.text("SELECT 1 FROM flow_metrics WHERE run_id = 'run-1' FOR UPDATE"))
        with pytest.raises(StoreError) as raised:
            store.record_pages("run-1", [page(KEYS)])

    assert not isinstance(raised.value, StoreUnavailableError)
    assert str(raised.value).startswith("LockNotAvailable: canceling statement due to lock")
    assert_shows_no_record(raised.value)
    [recorded] = store.record_pages("run-1", [page(KEYS)])
    assert recorded.claimed_keys == KEYS


def test_pages_of_an_unknown_run_quote_no_record_key(database_url: str) -> None:
    """The foreign key refuses the page rows: the caller's ValueError, chained to nothing."""
    store = Ledger(url=database_url)
    with pytest.raises(ValueError, match="Call start_run") as raised:
        store.record_pages("never-started", [page(KEYS)])
    assert_shows_no_record(raised.value)
    with pytest.raises(ValueError, match="Call start_run first") as raised:
        store.record_async_page("never-started", page(KEYS), {EMAIL: "job-1"})
    assert_shows_no_record(raised.value)


def test_any_failed_statement_is_a_store_error_with_the_driver_s_message_masked(
    database_url: str,
) -> None:
    store = Ledger(url=database_url)
    store.start_run("run-1", "orders", None, T0)
    statement = sa.text("SELECT * FROM no_such_table WHERE record_key = :key")
    with (
        pytest.raises(StoreError) as raised,
        db.transaction(store.engine(), write=False, retry_seconds=1) as conn,
    ):
        conn.execute(statement, {"key": EMAIL})
    assert "no_such_table" in str(raised.value)
    assert_shows_no_record(raised.value)
    if store.engine().dialect.name == "postgresql":  # the driver quotes the value itself
        with (
            pytest.raises(StoreError) as raised,
            db.transaction(store.engine(), write=False, retry_seconds=1) as conn,
        ):
            conn.execute(sa.text("SELECT CAST(:key AS integer)"), {"key": EMAIL})
        assert str(raised.value) == (
            'InvalidTextRepresentation: invalid input syntax for type integer: "<email>"'
        )
        assert_shows_no_record(raised.value)


def test_a_connection_lost_mid_transaction_is_store_unavailable(
    postgres_url: str, admin: sa.Engine
) -> None:
    store = Ledger(url=postgres_url)
    store.start_run("run-1", "orders", None, T0)
    with (
        pytest.raises(StoreUnavailableError, match="lost its connection") as raised,
        db.transaction(store.engine(), write=True, retry_seconds=1) as conn,
    ):
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        with admin.begin() as other:
            other.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        conn.execute(sa.text("SELECT :key"), {"key": EMAIL})
    assert_shows_no_record(raised.value)
    assert store.runs(run_id="run-1")  # the pool replaced the dead connection


@pytest.mark.parametrize("make", [db.new_engine, db.plain_engine])
def test_engines_never_render_parameters(database_url: str, make: object) -> None:
    """Even an error raised outside ``db.transaction`` (e.g. by Alembic) hides them."""
    engine = make(database_url)  # type: ignore[operator]
    try:
        with pytest.raises(sa.exc.SQLAlchemyError) as raised, engine.connect() as conn:
            conn.execute(sa.text("SELECT * FROM no_such_table WHERE k = :key"), {"key": EMAIL})
    finally:
        engine.dispose()
    assert "parameters hidden" in str(raised.value)
    assert EMAIL not in str(raised.value)
