"""Real Redis and PostgreSQL servers for development: the test session and the benchmark.

Not part of the installed package (``pyproject.toml`` installs ``flow_assets``,
``resources`` and ``sensors`` only): it is imported from the repository root, where
``pytest`` and ``python -m bench.run`` run.

Each server listens on 127.0.0.1 on a free port, keeps its files under a directory of its
own, and is stopped through the handle that started it (the child's pid, or ``pg_ctl -D``
on its own data directory): nothing else on the machine is touched. Servers still running
when the interpreter exits are stopped by an ``atexit`` hook as a second net. As root,
PostgreSQL (which refuses to run as root) runs as the ``postgres`` user.

Examples:
    >>> with start_redis(tmp_path) as redis_server:  # doctest: +SKIP
    ...     client = redis.Redis.from_url(redis_server.url)
    ...     redis_server.restart()  # same port, empty data set
    >>> with start_postgres(tmp_path) as pg:  # doctest: +SKIP
    ...     engine = sqlalchemy.create_engine(pg.create_database("flows"))
    ...     pg.stop(); pg.start()  # data survives
"""

from devservers.common import HOST, START_TIMEOUT_S, free_port
from devservers.postgres_server import (
    PG_USER,
    PostgresServer,
    find_postgres_bin,
    start_postgres,
)
from devservers.redis_server import RedisServer, find_redis_server, start_redis

__all__ = [
    "HOST",
    "PG_USER",
    "START_TIMEOUT_S",
    "PostgresServer",
    "RedisServer",
    "find_postgres_bin",
    "find_redis_server",
    "free_port",
    "start_postgres",
    "start_redis",
]
