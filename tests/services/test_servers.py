"""The dev servers (devservers/) and the shared fixtures on them work: real redis-server and
PostgreSQL started, stopped and restarted by their handles, nothing faked."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest
import redis
import sqlalchemy as sa

from devservers import PostgresServer, RedisServer, common, find_postgres_bin, start_redis


def _roundtrip(url: str) -> list[tuple[int, str]]:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)"))
            conn.execute(sa.text("INSERT INTO items VALUES (1, 'a'), (2, 'b')"))
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, name FROM items ORDER BY id")).all()
        return [tuple(row) for row in rows]
    finally:
        engine.dispose()


def _table_names(url: str) -> list[str]:
    engine = sa.create_engine(url)
    try:
        return sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_redis_starts_empty_and_keeps_values_with_ttl(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert client.dbsize() == 0
    client.set("flow:{demo:r1}:counts", "7", ex=3600)
    assert client.get("flow:{demo:r1}:counts") == b"7"
    assert 0 < client.ttl("flow:{demo:r1}:counts") <= 3600
    client.close()


def test_redis_restart_loses_data_on_same_port(redis_server: RedisServer, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.set("k", "v")
    port, pid = redis_server.port, redis_server.pid
    redis_server.restart()
    assert (redis_server.port, redis_server.url) == (port, redis_url)
    assert redis_server.pid != pid
    assert client.get("k") is None
    client.close()


def test_redis_stopped_refuses_connections(redis_server: RedisServer, redis_url: str) -> None:
    redis_server.stop()
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=1)
    with pytest.raises(redis.ConnectionError):
        client.ping()
    redis_server.start()
    assert client.ping() is True
    client.close()


def test_redis_started_and_closed_leaves_no_process(tmp_path: Path) -> None:
    with start_redis(tmp_path / "redis") as server:
        pid = server.pid
        assert pid is not None and psutil.pid_exists(pid)
        assert server in common._LIVE  # the atexit net would stop it
        with redis.Redis.from_url(server.url) as client:
            assert client.ping() is True
    assert not server.running
    assert not psutil.pid_exists(pid)
    assert server not in common._LIVE


def test_postgres_create_insert_select(postgres_url: str) -> None:
    assert postgres_url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
    assert _roundtrip(postgres_url) == [(1, "a"), (2, "b")]


def test_postgres_stop_then_start_keeps_data(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    assert _roundtrip(postgres_url) == [(1, "a"), (2, "b")]
    postgres_server.stop()
    assert not postgres_server.running
    engine = sa.create_engine(postgres_url)
    with pytest.raises(sa.exc.OperationalError), engine.connect():
        pass
    postgres_server.start()
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM items")).scalar_one() == 2
    engine.dispose()


def test_postgres_restart_keeps_data_on_same_port(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    _roundtrip(postgres_url)
    port, pid = postgres_server.port, postgres_server.pid
    postgres_server.restart()
    assert postgres_server.running
    assert (postgres_server.port, postgres_server.pid != pid) == (port, True)
    assert _table_names(postgres_url) == ["items"]


def test_postgres_runs_unprivileged(postgres_server: PostgresServer) -> None:
    """PostgreSQL refuses root: as root the dev server runs as the postgres user."""
    pid = postgres_server.pid
    assert pid is not None
    owner = psutil.Process(pid).username()
    if os.geteuid() == 0:
        assert (postgres_server.run_as, owner) == ("postgres", "postgres")
    else:
        assert postgres_server.run_as is None


def test_postgres_databases_are_isolated(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    assert _table_names(postgres_url) == []
    _roundtrip(postgres_url)
    other = postgres_server.create_database("test_isolation_other")
    try:
        assert _table_names(other) == []
        assert _table_names(postgres_url) == ["items"]
    finally:
        postgres_server.drop_database("test_isolation_other")


def test_database_url_is_fresh_on_each_backend(database_url: str) -> None:
    assert _table_names(database_url) == []
    assert _roundtrip(database_url) == [(1, "a"), (2, "b")]


def test_flow_home_is_a_fresh_directory_in_env(flow_home: Path) -> None:
    assert os.environ["FLOW_HOME"] == str(flow_home)
    assert flow_home.is_dir()
    assert list(flow_home.iterdir()) == []


def test_missing_postgres_binaries_raise_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="apt-get install postgresql"):
        find_postgres_bin(path=str(tmp_path), roots=[tmp_path])


def test_services_marker_is_applied(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("services") is not None
