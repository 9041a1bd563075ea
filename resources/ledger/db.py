"""URLs, engines and connections of the metrics database (schema versions: migrations).

No Dagster import here: Alembic's ``env.py`` and the CLI use this module directly.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)

from resources.errors import (
    ConfigurationError,
    FlowError,
    StoreError,
    StoreIntegrityError,
    StoreUnavailableError,
)
from resources.home import ENV_FLOW_HOME, flow_home
from resources.redaction import (
    RESERVED_FIX,
    mask_personal_data,
    redact_text,
    redact_url,
    userinfo_problem,
)

ENV_DATABASE_URL = "FLOW_DATABASE_URL"
SQLITE_FILE_NAME = "flow_metrics.db"
SQLITE_BUSY_TIMEOUT_S = 30
PG_CONNECT_TIMEOUT_S = 5
DRIVER_MESSAGE_CHARS = 300

_DRIVERS = {"postgresql": ("psycopg", "psycopg2"), "sqlite": ("pysqlite",)}
_WRITE = "flow_write"  # connection execution option: SQLite takes the write lock at BEGIN

log = logging.getLogger(__name__)

_ENGINES: dict[tuple[int, str, Callable[[str], Engine]], Engine] = {}
_SCHEMA_READY: set[tuple[int, str]] = set()
_LOCK = threading.Lock()


def resolve_url(url: str | None) -> str:
    """The database URL to use: ``url``, else ``$FLOW_DATABASE_URL``, else SQLite in FLOW_HOME.

    Raises:
        ConfigurationError: the URL is unparsable (a password with reserved characters not
            percent-encoded included), in-memory, or not PostgreSQL/SQLite.
    """
    if url:
        # An EnvVar("FLOW_DATABASE_URL") arrives here already resolved: name the variable.
        from_env = url == os.environ.get(ENV_DATABASE_URL, "").strip()
        return normalize_url(url, ENV_DATABASE_URL if from_env else "MetricsStore `url`")
    env_url = os.environ.get(ENV_DATABASE_URL, "").strip()
    if env_url:
        return normalize_url(env_url, ENV_DATABASE_URL)
    home = flow_home()
    _make_dir(home, ENV_FLOW_HOME)
    return f"sqlite:///{home / SQLITE_FILE_NAME}"


def _make_dir(path: Path, setting: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot create {path} for the metrics database ({exc.strerror}); set {setting}"
            " to a writable location."
        ) from None


def redacted(url: str) -> str:
    """``url`` safe to show: password and query secrets masked."""
    # redact_url re-assembles the URL and would turn sqlite:////abs/path into
    # sqlite://abs/path; a SQLite file URL carries no credentials anyway.
    if url.startswith("sqlite"):
        return url
    return redact_url(url)


@lru_cache(maxsize=64)  # called on every store operation; parsing once is enough
def normalize_url(raw: str, setting: str) -> str:
    """Validate ``raw`` and return it with an explicit driver (``postgresql+psycopg``).

    Raises:
        ConfigurationError: naming ``setting`` and the fix. A URL whose user name or
            password cannot be parsed is not quoted at all, redacted or not: where its
            password ends is exactly what is unknown.
    """
    fix = (
        f"set {setting} to a URL such as postgresql+psycopg://user:password@host:5432/db"
        " or sqlite:////absolute/path/flow_metrics.db"
    )
    problem = userinfo_problem(raw)
    if problem is not None:
        raise ConfigurationError(
            f"{setting} is not a valid database URL: {problem} (the URL is not shown, so that"
            f" no part of its password is). Fix: {RESERVED_FIX}."
        )
    try:
        parsed = make_url(raw)
    except (ArgumentError, ValueError):
        # `from None`: the parser's own message may quote the raw URL, password included.
        raise ConfigurationError(
            f"{setting}={redacted(raw)!r} is not a valid database URL: {fix}."
        ) from None
    backend = parsed.get_backend_name()
    if backend == "postgres":
        raise ConfigurationError(
            f"{setting}={redacted(raw)!r} uses the scheme postgres://, which SQLAlchemy does not"
            " accept: use postgresql+psycopg:// (for example"
            " postgresql+psycopg://user:password@host:5432/db)."
        )
    if backend not in _DRIVERS:
        raise ConfigurationError(
            f"{setting}={redacted(raw)!r} uses the unsupported database {backend!r};"
            f" only PostgreSQL and SQLite are supported: {fix}."
        )
    try:
        driver = parsed.get_driver_name()  # without "+driver": loads the dialect's default
    except NoSuchModuleError:
        driver = parsed.drivername.partition("+")[2]
    if backend == "postgresql" and "+" not in parsed.drivername:
        parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3, not psycopg2
    elif driver not in _DRIVERS[backend]:
        raise ConfigurationError(
            f"{setting}={redacted(raw)!r} names the driver {driver!r}, which this package"
            f" does not support; use one of {', '.join(_DRIVERS[backend])}: {fix}."
        )
    if backend == "sqlite":
        parsed = _sqlite_file_url(parsed, raw, setting)
    return parsed.render_as_string(hide_password=False)


def _sqlite_file_url(parsed: URL, raw: str, setting: str) -> URL:
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file::memory:"):
        raise ConfigurationError(
            f"{setting}={redacted(raw)!r} is an in-memory SQLite database, which loses the"
            f" ledger when the process ends; set {setting} to a file such as"
            " sqlite:////absolute/path/flow_metrics.db"
        )
    _make_dir(Path(database).expanduser().parent, setting)
    return parsed


def get_engine(url: str) -> Engine:
    """The process's ledger engine for ``url`` (engines never cross a fork)."""
    return cached_engine(url, new_engine)


def cached_engine(url: str, make: Callable[[str], Engine]) -> Engine:
    """The process's engine for ``url`` made by ``make`` (engines never cross a fork; the
    ledger's and a SQL source's engines for one URL differ in their settings)."""
    key = (os.getpid(), url, make)
    with _LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _ENGINES[key] = make(url)
        return engine


def plain_engine(url: str) -> Engine:
    """A new engine with this package's timeouts only: for databases the package reads
    (SQL sources) and must not reconfigure, unlike its ledger (WAL, foreign keys)."""
    parsed = make_url(url)
    return create_engine(
        url, pool_pre_ping=True, hide_parameters=True, connect_args=_connect_args(parsed)
    )


def _connect_args(parsed: URL) -> dict[str, Any]:
    if parsed.get_backend_name() == "sqlite":
        return {"timeout": SQLITE_BUSY_TIMEOUT_S}
    return {} if "connect_timeout" in parsed.query else {"connect_timeout": PG_CONNECT_TIMEOUT_S}


def new_engine(url: str, *, foreign_keys: bool = True, **kwargs: Any) -> Engine:
    """A new, uncached engine with this package's connection settings; its errors never
    quote a statement's parameters (record keys)."""
    parsed = make_url(url)
    kwargs.setdefault("hide_parameters", True)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, connect_args=_connect_args(parsed), **kwargs)
    engine = create_engine(url, connect_args=_connect_args(parsed), **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Autocommit at the driver level; the "begin" hook below emits BEGIN itself, so
        # DDL is transactional and writers can take the lock up front.
        dbapi_conn.isolation_level = None
        dbapi_conn.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        dbapi_conn.execute("PRAGMA journal_mode=WAL")
        dbapi_conn.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A deferred transaction that reads and then writes fails at once with
        # SQLITE_BUSY when another writer got in between; IMMEDIATE waits instead.
        write = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def schema_ready(url: str) -> bool:
    """Whether this process already checked that ``url``'s schema is at head."""
    return (os.getpid(), url) in _SCHEMA_READY


def set_schema_ready(url: str, ready: bool) -> None:
    with _LOCK:
        if ready:
            _SCHEMA_READY.add((os.getpid(), url))
        else:
            _SCHEMA_READY.discard((os.getpid(), url))


def dispose_engines() -> None:
    """Close this process's pooled connections and forget its schema checks (tests, CLI)."""
    with _LOCK:
        for (pid, _url, _make), engine in _ENGINES.items():
            if pid == os.getpid():
                engine.dispose()
        _ENGINES.clear()
        _SCHEMA_READY.clear()


@contextmanager
def transaction(engine: Engine, *, write: bool, retry_seconds: float) -> Iterator[Connection]:
    """One transaction on ``engine``; a failed connect is retried with backoff and jitter.

    Only connecting is retried: a statement that fails mid-transaction is not, because the
    caller cannot know whether its commit landed (a compare-and-set must not run twice).

    Raises:
        StoreUnavailableError: no connection within ``retry_seconds``, or the connection
            was lost during the transaction.
        StoreIntegrityError: a statement broke a constraint.
        StoreError: any other failed statement (a lock or statement timeout...).
    """
    conn = _connect_with_retry(engine, retry_seconds)
    try:
        conn.execution_options(**{_WRITE: write})
        with conn.begin():
            yield conn
    except SQLAlchemyError as exc:
        raise_unchained(_statement_error(engine, exc))
    finally:
        conn.close()


def _statement_error(engine: Engine, exc: SQLAlchemyError) -> FlowError:
    """A failed statement as this package's error, quoting the driver's message only."""
    reason = f"{type(driver_error(exc)).__name__}: {driver_message(exc)}"
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        where = redacted(engine.url.render_as_string(hide_password=False))
        return StoreUnavailableError(
            f"the metrics database {where} lost its connection during a transaction"
            f" ({reason}). Check that the database server is running and reachable."
        )
    if isinstance(exc, IntegrityError):
        return StoreIntegrityError(reason)
    return StoreError(reason)


def driver_error(exc: BaseException) -> BaseException:
    """The DB-API driver's exception SQLAlchemy wrapped, else ``exc``."""
    return getattr(exc, "orig", None) or exc


def driver_message(exc: BaseException, limit: int = DRIVER_MESSAGE_CHARS) -> str:
    """The driver's message on one line, safe to show: secrets redacted, personal data
    masked, at most ``limit`` characters. Never SQLAlchemy's text, which appends the
    statement's parameters; of PostgreSQL's, the first line and any ``HINT`` only (its
    ``DETAIL`` and ``CONTEXT`` may quote row and parameter values)."""
    first, *more = str(driver_error(exc)).splitlines() or [""]
    kept = " ".join([first, *(line for line in more if line.startswith("HINT:"))])
    text = mask_personal_data(redact_text(" ".join(kept.split())))
    return text if len(text) <= limit else text[: limit - 5] + "[...]"


def raise_unchained(error: BaseException) -> NoReturn:
    """Raise ``error`` chained to nothing: no ``__cause__``, and no ``__context__`` either
    (Python sets it to the exception being handled, and not every tool honours
    ``from None``)."""
    try:
        raise error from None
    finally:
        error.__context__ = None


def _connect_with_retry(engine: Engine, retry_seconds: float) -> Connection:
    where = redacted(engine.url.render_as_string(hide_password=False))

    def give_up(exc: Exception, attempts: int, elapsed: float) -> Exception:
        check = (
            "that the file's directory exists and is writable"
            if engine.dialect.name == "sqlite"
            else "that the database server is running and reachable"
        )
        return StoreUnavailableError(
            f"cannot connect to the metrics database {where} ({attempts} attempts in"
            f" {elapsed:.1f}s): {_one_line(exc)} Check {check}, and that {ENV_DATABASE_URL}"
            " (or the MetricsStore `url`) points at it."
        )

    def warn(exc: Exception, attempt: int, delay: float) -> None:
        log.warning(
            "metrics database %s unreachable (attempt %d: %s) retrying in %.2fs",
            where,
            attempt,
            _one_line(exc),
            delay,
        )

    return connect_with_retry(engine, retry_seconds, give_up, warn)


def connect_with_retry(
    engine: Engine,
    retry_seconds: float,
    give_up: Callable[[Exception, int, float], Exception],
    on_retry: Callable[[Exception, int, float], None] | None = None,
) -> Connection:
    """A connection to ``engine``; a failed connect is retried with exponential backoff
    and jitter (0.2 s doubling to 2 s) for ``retry_seconds``, then ``give_up(error,
    attempts, elapsed seconds)`` is raised. ``on_retry(error, attempt, delay)`` is told of
    each retry."""
    started, attempt = time.monotonic(), 0
    while True:
        attempt += 1
        try:
            return engine.connect()
        except (OperationalError, InterfaceError) as exc:
            elapsed = time.monotonic() - started
            delay = min(0.2 * 2 ** (attempt - 1), 2.0) * random.uniform(0.5, 1.0)
            if elapsed + delay > retry_seconds:
                raise_unchained(give_up(exc, attempt, elapsed))
            if on_retry is not None:
                on_retry(exc, attempt, delay)
            time.sleep(delay)


def _one_line(exc: Exception) -> str:
    """The driver's error, safe to show (``driver_message``), ending with a full stop."""
    reason = driver_message(exc)
    return reason + ("" if reason.endswith((".", "?", "!")) else ".")
