"""The benchmark's world: real Redis and PostgreSQL servers, Dagster instances, the machine.

Servers are started with :mod:`devservers` under a temporary directory and stopped by
:func:`bench_environment` on the way out, whether the run ends, fails, or is interrupted
(Ctrl-C, or SIGTERM turned into the same KeyboardInterrupt).
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
import psycopg
import redis

from devservers import PostgresServer, RedisServer, start_postgres, start_redis


@dataclass
class BenchServers:
    """The servers of one benchmark run and the scratch directory next to them.

    Args:
        redis_server: a real redis-server (no persistence).
        postgres: a real PostgreSQL cluster.
        workdir: scratch space (data files, Dagster homes), removed at the end.
    """

    redis_server: RedisServer
    postgres: PostgresServer
    workdir: Path

    @property
    def redis_url(self) -> str:
        return self.redis_server.url

    def redis_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    def flush_redis(self) -> None:
        with self.redis_client() as client:
            client.flushall()

    def new_database(self, prefix: str) -> str:
        """A fresh, empty database; its SQLAlchemy URL."""
        return self.postgres.create_database(f"{prefix}_{uuid.uuid4().hex[:10]}")

    @contextmanager
    def dagster_instance(self, prefix: str) -> Iterator[Any]:
        """A Dagster instance whose run, event and schedule storage is on this PostgreSQL."""
        import dagster as dg

        home = self.dagster_home(prefix)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            yield instance

    def dagster_home(self, prefix: str) -> Path:
        """A DAGSTER_HOME whose ``dagster.yaml`` puts all storage on a fresh PG database."""
        url = self.new_database(prefix)
        home = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=self.workdir))
        return self.postgres.dagster_home(home, url.rsplit("/", 1)[1])


def psycopg_url(sqlalchemy_url: str) -> str:
    """The libpq form of a ``postgresql+psycopg://`` URL (for raw psycopg connections)."""
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def bench_environment() -> Iterator[BenchServers]:
    """Start Redis and PostgreSQL in a temp dir; stop them and remove it however we leave."""
    workdir = Path(tempfile.mkdtemp(prefix="flow-bench-"))
    # Both signals raise KeyboardInterrupt, even when started with SIGINT ignored (a
    # background job): Dagster re-points SIGTERM at SIGINT's handler whenever it captures
    # interrupts, so SIGINT must have a live handler for SIGTERM to keep working.
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
        signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_interrupt),
    }
    redis_server: RedisServer | None = None
    postgres: PostgresServer | None = None
    try:
        redis_server = start_redis(workdir / "redis")
        postgres = start_postgres(workdir / "postgres")
        yield BenchServers(redis_server, postgres, workdir)
    finally:
        for server in (postgres, redis_server):
            if server is not None:
                server.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        shutil.rmtree(workdir, ignore_errors=True)


def redis_version(servers: BenchServers) -> str:
    with servers.redis_client() as client:
        return str(client.info("server")["redis_version"])


def postgres_version(servers: BenchServers) -> str:
    with psycopg.connect(psycopg_url(servers.postgres.admin_url)) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "unknown"


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "uname": " ".join(platform.uname()),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def python_version() -> str:
    return f"{platform.python_implementation()} {sys.version.split()[0]}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
