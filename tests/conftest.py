"""Shared fixtures: real Redis and PostgreSQL servers started by the test session itself.

The servers start lazily, the first time a test asks for them, so pure unit tests run
without any. Each test gets its own clean state: a flushed Redis, a fresh PostgreSQL
database, a fresh SQLite file.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

from devservers import PostgresServer, RedisServer, start_postgres, start_redis
from resources.live.embedded_redis import stop_embedded_redis

if TYPE_CHECKING:
    import dagster as dg

    from resources.ledger.ledger import Ledger

TESTS_DIR = Path(__file__).parent
# Each test is marked with the tier folder it lives in; the markers are in pyproject.toml.
TIERS = ("unit", "services", "dagster", "faults")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            tier = item.path.relative_to(TESTS_DIR).parts[0]
        except ValueError:
            continue
        if tier in TIERS:
            item.add_marker(tier)


@pytest.fixture(scope="session", autouse=True)
def _session_flow_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Tests never use the repository's ``.flow_home``: FLOW_HOME defaults to a session
    directory (a test's own ``flow_home`` overrides it), and an embedded Redis that some
    code under test started there is stopped at the end instead of outliving the session."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLOW_HOME", str(home))
        yield home
        stop_embedded_redis(home)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server for the whole session (no persistence)."""
    with start_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the whole session."""
    with start_postgres(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session Redis, flushed before the test."""
    # A fault test that failed halfway may have left the server stopped.
    redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """SQLAlchemy URL of a fresh, empty PostgreSQL database, dropped after the test."""
    postgres_server.start()
    name = f"test_{uuid.uuid4().hex[:16]}"
    url = postgres_server.create_database(name)
    yield url
    postgres_server.start()
    postgres_server.drop_database(name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """SQLAlchemy URL of a fresh SQLite file."""
    return f"sqlite:///{tmp_path / 'flow.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """A fresh database URL, once on SQLite and once on PostgreSQL."""
    fixture = {"sqlite": "sqlite_url", "postgresql": "postgres_url"}[request.param]
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def flow_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh directory set as ``FLOW_HOME`` for the test."""
    home = tmp_path / "flow_home"
    home.mkdir()
    monkeypatch.setenv("FLOW_HOME", str(home))
    return home


@pytest.fixture(autouse=True)
def _fresh_engines() -> Iterator[None]:
    """Each test gets its own database: drop pooled connections to the previous ones."""
    yield
    from resources.ledger import db

    db.dispose_engines()


@pytest.fixture
def store(database_url: str) -> Ledger:
    """A ledger on the test's database (PostgreSQL and SQLite)."""
    from resources.ledger.ledger import Ledger

    return Ledger(url=database_url)


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    """A temporary Dagster instance, its storage and compute logs under the test's
    ``tmp_path`` (where the security tests search every output for secrets). Dagster is
    imported here: unit tests do not pay for it."""
    import dagster as dg

    home = tmp_path / "dagster_instance"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as test_instance:
        yield test_instance


@pytest.fixture
def postgres_instance(
    postgres_server: PostgresServer, tmp_path: Path
) -> Iterator[dg.DagsterInstance]:
    """A Dagster instance whose run, event log and schedule storage is a fresh PostgreSQL
    database (dagster-postgres), dropped after the test."""
    import dagster as dg

    name = f"dagster_{tmp_path.name[-12:].replace('-', '_').lower()}"
    postgres_server.create_database(name)
    home = postgres_server.dagster_home(tmp_path / "dagster_home", name)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        yield instance
    postgres_server.drop_database(name)
