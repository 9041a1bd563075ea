"""Alembic migrations on real SQLite files and a real PostgreSQL server; nothing faked."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from resources.counts import Counts
from resources.errors import ConfigurationError
from resources.ledger import db, migrations
from resources.ledger.ledger import Ledger
from resources.ledger.records import PageRecord, RejectedRecord
from resources.ledger.schema import FINAL_STATUSES, VERSION_TABLE, metadata
from tests.ledger_helpers import finalize

pytestmark = pytest.mark.services

T0 = datetime(2025, 1, 6, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def store(database_url: str) -> Ledger:
    return Ledger(url=database_url, auto_migrate=False)


def _statuses(store: Ledger) -> dict[str, str]:
    with store.engine().connect() as conn:
        rows = conn.execute(text("SELECT run_id, flow_status FROM flow_metrics"))
        return {run_id: status for run_id, status in rows}


def _count(store: Ledger, table: str) -> int:
    with store.engine().connect() as conn:
        return int(conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one())


def _fill_every_status(store: Ledger) -> None:
    """One run per status, each with a page row; partial_success also has a reject."""
    page = PageRecord(
        0,
        Counts(source=2, dispatched=1, rejected=1, completed=1),
        "done",
        ["k"],
        rejects=[RejectedRecord(1, "bad", "{}")],
    )
    for n, status in enumerate(("running", *FINAL_STATUSES)):
        run_id = f"run-{status}"
        store.start_run(run_id, "orders", None, T0 + timedelta(minutes=n))
        store.record_pages(run_id, [page])
        if status != "running":
            finalize(store, run_id, status=status, counts=page.counts, pages_done=1, finished_at=T0)


def test_upgrade_downgrade_upgrade_keeps_every_row(store: Ledger) -> None:
    assert store.current_revision() is None
    store.upgrade()
    _fill_every_status(store)
    assert _statuses(store)["run-partial_success"] == "partial_success"

    store.downgrade("0001")

    assert store.current_revision() == "0001"
    assert _statuses(store) == {
        "run-running": "running",
        "run-completed": "completed",
        "run-partial_success": "completed",
        "run-failed": "failed",
        "run-cancelled": "cancelled",
    }
    # Recreating flow_metrics on SQLite must not cascade into the page rows.
    assert _count(store, "flow_page_progress") == 5
    with store.engine().begin() as conn, pytest.raises(IntegrityError):
        conn.execute(text("UPDATE flow_metrics SET flow_status = 'partial_success'"))

    store.upgrade()

    assert store.current_revision() == migrations.head_revision()
    assert _count(store, "flow_page_progress") == 5
    [row] = store.runs(run_id="run-partial_success")
    assert (row.flow_status, row.counts.rejected, row.counter_mismatch) == ("completed", 1, None)
    assert finalize(
        store,
        "run-running",
        status="partial_success",
        counts=Counts(),
        pages_done=0,
        finished_at=T0,
    )


def test_head_schema_matches_schema_py(store: Ledger) -> None:
    store.upgrade()

    with store.engine().connect() as conn:
        context = MigrationContext.configure(conn, opts=migrations.migration_options())
        assert compare_metadata(context, metadata) == []
        # compare_metadata ignores a partial index's WHERE clause: check it here.
        wheres = {
            index["name"]: str(index.get("dialect_options", {}).get(f"{conn.dialect.name}_where"))
            for index in inspect(conn).get_indexes("flow_metrics")
        }
    assert "running" in wheres["ix_flow_metrics_running"]
    assert "published_at IS NULL" in wheres["ix_flow_metrics_unpublished"]


def test_downgrade_to_base_removes_only_our_tables(store: Ledger) -> None:
    store.upgrade()
    with store.engine().begin() as conn:
        conn.execute(text("CREATE TABLE someone_elses (id INTEGER PRIMARY KEY)"))

    store.downgrade("base")

    with store.engine().connect() as conn:
        assert set(inspect(conn).get_table_names()) == {"someone_elses", VERSION_TABLE}
    assert store.current_revision() is None
    store.upgrade()
    assert store.current_revision() == migrations.head_revision()


def test_an_unknown_or_wrong_way_revision_is_a_configuration_error(store: Ledger) -> None:
    store.upgrade("0002")

    with pytest.raises(ConfigurationError, match="'nonsense'"):
        store.downgrade("nonsense")
    with pytest.raises(ConfigurationError, match="cannot downgrade"):
        store.downgrade("0003")
    assert store.current_revision() == "0002"


def test_concurrent_upgrades_of_an_empty_database_both_succeed(database_url: str) -> None:
    url = db.resolve_url(database_url)
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []

    def upgrade() -> None:
        barrier.wait()
        try:
            migrations.migrate(url, "head", downgrade=False, retry_seconds=5)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=upgrade) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)  # a hang guard, not a timing assertion
    assert not any(thread.is_alive() for thread in threads)

    assert errors == []
    assert Ledger(url=database_url).current_revision() == migrations.head_revision()


def test_a_database_from_a_newer_release_is_a_configuration_error(store: Ledger) -> None:
    store.upgrade()
    with store.engine().begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999_future'"))
    db.dispose_engines()  # forget that this process already checked the schema

    with pytest.raises(ConfigurationError, match="newer release"):
        Ledger(url=store.url).runs()
