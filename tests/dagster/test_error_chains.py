"""Nothing chained to a step's error quotes record data (review 12, finding 2).

Dagster stores a failed step's exception with its ``__cause__`` and ``__context__`` in full,
and SQLAlchemy's text of an error quotes the statement's parameters: the SQL source's
keyset value, the ledger's claimed keys and failure rows (record keys, here emails). Real
Dagster runs, SQLite and PostgreSQL (tests/conftest.py); nothing is faked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from flow_assets.dispatch import JobBatch
from flow_assets.flow import Flow
from flow_assets.sources.files import FileSource
from flow_assets.sources.sql import SqlSource
from tests.dagster.test_security import visible_outputs
from tests.flowkit import make_defs, run_flow

DOMAIN = "@example.com"
NO_RETRY = dg.RetryPolicy(max_retries=0)


def step_failures(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """Each failed step's error as Dagster shows it: message, stack, cause and context."""
    errors = [
        entry.dagster_event.step_failure_data.error
        for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
        if entry.dagster_event is not None
    ]
    return [error.to_string() for error in errors if error is not None]


def assert_no_record_key(instance: dg.DagsterInstance, run_id: str, flow: str) -> None:
    leaks = {
        where: text.count(DOMAIN)
        for where, text in visible_outputs(instance, [run_id], [flow]).items()
        if DOMAIN in text
    }
    assert not leaks, f"record keys leaked into: {leaks}"


def test_a_failed_sql_source_read_leaves_no_record_key_in_dagster(
    instance: dg.DagsterInstance, redis_url: str, sqlite_url: str, tmp_path: Path
) -> None:
    """SQLite computes a column row by row: the row after the fourth fails to, so page 2's
    query fails with page 1's last key (an email) bound as its parameter."""
    url = f"sqlite:///{tmp_path / 'source.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE customers (email TEXT PRIMARY KEY NOT NULL, n TEXT)"))
        rows = [{"email": f"user{i}{DOMAIN}", "n": "1"} for i in range(5)]
        conn.execute(sa.text("INSERT INTO customers VALUES (:email, :n)"), rows)
        conn.execute(sa.text(f"INSERT INTO customers VALUES ('zed{DOMAIN}', '{{bad')"))
    engine.dispose()
    query = "SELECT email, json_extract(n, '$') AS n FROM customers"
    source = SqlSource(url, query=query, key_column="email", page_size=2, name="customers")
    flow = Flow(name="sql_chain", source=source, key="email", handler=print, retry_policy=NO_RETRY)

    result = run_flow(make_defs([flow], redis_url, sqlite_url), flow.name, instance)

    assert not result.success
    [failure] = step_failures(instance, result.run_id)
    assert "Source 'customers', page 2" in failure and "malformed JSON" in failure
    assert_no_record_key(instance, result.run_id, flow.name)


@pytest.fixture
def row_locks(postgres_url: str) -> Iterator[sa.Connection]:
    """A session of the test's own on the ledger's database, which gives up waiting for a
    lock after 300 ms; its transaction is rolled back at the end."""
    engine = sa.create_engine(postgres_url)
    with engine.begin() as conn:
        database = make_url(postgres_url).database
        conn.execute(sa.text(f"ALTER DATABASE \"{database}\" SET lock_timeout = '300ms'"))
    try:
        with engine.connect() as conn, conn.begin():
            yield conn
    finally:
        engine.dispose()


def test_a_ledger_lock_timeout_leaves_no_record_key_in_dagster(
    instance: dg.DagsterInstance,
    redis_url: str,
    postgres_url: str,
    row_locks: sa.Connection,
    tmp_path: Path,
) -> None:
    """The handler fails its records, then another session locks the run's row (as an
    operator's long transaction would): writing the page's failure rows, whose parameters
    are the record keys, times out. The step fails with a StoreError quoting none."""
    data = tmp_path / "customers.jsonl"
    data.write_text("".join(json.dumps({"id": f"c{i}{DOMAIN}"}) + "\n" for i in range(3)))

    def fail_then_lock(batch: JobBatch) -> None:
        batch.fail_pending("refused downstream")
        row_locks.execute(sa.text("SELECT 1 FROM flow_metrics FOR UPDATE"))

    flow = Flow(
        name="ledger_chain",
        source=FileSource(str(data)),
        key="id",
        handler=fail_then_lock,
        retry_policy=NO_RETRY,
    )

    result = run_flow(make_defs([flow], redis_url, postgres_url), flow.name, instance)

    assert not result.success
    [failure] = step_failures(instance, result.run_id)
    assert "StoreError: LockNotAvailable: canceling statement due to lock timeout" in failure
    assert_no_record_key(instance, result.run_id, flow.name)
