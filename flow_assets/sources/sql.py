"""Records from a SQL table or query (PostgreSQL, SQLite), read with keyset pagination.

Each page is ``... WHERE key > :last ORDER BY key LIMIT :page_size`` (SQLAlchemy Core): page N
costs what page 0 costs (no OFFSET scan), gaps in the key do not matter, and a re-read of the
same data gives the same pages. The key must be unique, or made unique with a tiebreak column:
rows sharing a key across a page boundary would be skipped by ``key > :last``, so that case is
detected and raises instead.

Values are made JSON-friendly (``flow_assets.sources.sql_values``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from decimal import InvalidOperation
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import NoSuchTableError, SQLAlchemyError
from sqlalchemy.sql.selectable import SelectBase

from flow_assets.errors import FlowDefinitionError, SourceError
from flow_assets.options import require_int, require_name
from flow_assets.sources.base import Page, SequentialSource
from flow_assets.sources.sql_options import checked_selection, checked_url
from flow_assets.sources.sql_values import jsonable, partition_condition
from resources.errors import ConfigurationError
from resources.ledger.db import (
    cached_engine,
    connect_with_retry,
    dispose_engines,
    driver_error,
    driver_message,
    normalize_url,
    plain_engine,
    raise_unchained,
    redacted,
)
from resources.redaction import mask_personal_data

__all__ = ["SqlSource", "dispose_engines"]

SHOWN_QUERY_CHARS = 80
_SUBQUERY = "flow_source"


class SqlSource(SequentialSource):
    """Records from a table or a query, in pages ordered by a unique key.

    Sequential: ``plan`` returns None and ``pages`` reads page after page, each starting after
    the last key of the one before. Rows whose key is NULL cannot be paginated and raise.

    Args:
        url: SQLAlchemy URL of a PostgreSQL or SQLite database; a Dagster ``EnvVar`` is read
            when the source first connects, so the URL never appears in the definitions.
        table: a table or view, ``name`` or ``schema.name`` (reflected). Exactly one of
            ``table`` and ``query``.
        query: a SQLAlchemy ``select(...)``, or a SQL string (wrapped as a subquery; no
            trailing ``LIMIT``/``ORDER BY`` needed).
        key_column: the column pages are ordered and split by; unique, not NULL, and
            indexed for speed.
        page_size: records per page.
        columns: the columns to read (default: all); the key and tiebreak are always read.
        partition_column: if set, a run reads only rows where it equals the partition key
            (converted to the column's type: date, datetime, int, float, Decimal).
        tiebreak_column: makes ``(key_column, tiebreak_column)`` the unique order when the
            key alone has ties (e.g. ``key_column="updated_at", tiebreak_column="id"``).
        connect_retry_seconds: how long a failed connect is retried (backoff with jitter).
        name: name used in errors and logs (default: the table, or ``"query"``).

    Examples:
        >>> SqlSource(
        ...     "postgresql://app:s3cret@db:5432/shop",
        ...     table="sales.orders",
        ...     key_column="id",
        ...     partition_column="order_date",
        ... )  # doctest: +ELLIPSIS
        SqlSource(postgresql+psycopg://app:***@db:5432/shop, table='sales.orders', key='id', ...)
    """

    def __init__(
        self,
        url: str,
        *,
        table: str | None = None,
        query: str | SelectBase | None = None,
        key_column: str,
        page_size: int = 1000,
        columns: Sequence[str] | None = None,
        partition_column: str | None = None,
        tiebreak_column: str | None = None,
        connect_retry_seconds: float = 10.0,
        name: str | None = None,
    ) -> None:
        # A Dagster EnvVar is a str whose str() raises: keep only its name, read it later.
        self._env_var: str | None = getattr(url, "env_var_name", None)
        self._url = None if self._env_var is not None else checked_url(url)
        query = checked_selection(table, query)
        self.key_column = require_name(key_column, "key_column")
        self.tiebreak_column = tiebreak_column
        if tiebreak_column is not None:
            require_name(tiebreak_column, "tiebreak_column")
            if tiebreak_column == key_column:
                raise FlowDefinitionError(
                    "tiebreak_column must differ from key_column; both are "
                    f"{key_column!r}. Fix: pass a column that is unique among equal keys."
                )
        if partition_column is not None:
            require_name(partition_column, "partition_column")
        if isinstance(columns, str) or (columns is not None and not columns):
            raise FlowDefinitionError(f"columns must be a list of column names, got {columns!r}.")
        retry = connect_retry_seconds
        if isinstance(retry, bool) or not isinstance(retry, (int, float)) or retry < 0:
            raise FlowDefinitionError(f"connect_retry_seconds must be >= 0, got {retry!r}.")
        self.table = table
        self.query = query
        self.page_size = require_int(page_size, "page_size", 1)
        self.columns = (
            None
            if columns is None
            else tuple(dict.fromkeys(require_name(c, "columns") for c in columns))
        )
        self.partition_column = partition_column
        self.connect_retry_seconds = float(connect_retry_seconds)
        self.name = name or table or "query"

    def __str__(self) -> str:
        where = f"EnvVar({self._env_var!r})" if self._env_var else redacted(self._url or "")
        if self.table is not None:
            what = f"table={self.table!r}"
        else:
            sql = " ".join(str(self.query).split())
            if len(sql) > SHOWN_QUERY_CHARS:
                sql = sql[: SHOWN_QUERY_CHARS - 3] + "..."
            what = f"query={sql!r}"
        key = ", ".join(self._order_names())
        key = key if self.tiebreak_column is None else f"({key})"
        return f"SqlSource({where}, {what}, key={key!r}, page_size={self.page_size})"

    __repr__ = __str__

    # -- the Source protocol ---------------------------------------------------------------

    def pages(self, partition_key: str | None) -> Iterator[Page]:
        """Every row (of the partition), in key order, ``page_size`` per page.

        An empty source yields no page. Raises SourceError on a NULL key, or on rows sharing
        a key across a page boundary.
        """
        url = self._resolved_url()
        engine = cached_engine(url, plain_engine)
        with self._connect(engine, 0) as conn:
            source = self._reflect(conn, 0)
            order = [source.c[c] for c in self._order_names()]
            filters = self._filters(source, partition_key)
            self._check_no_null_keys(conn, source, order, filters)
        wanted = self.columns or tuple(source.c.keys())
        selected = [source.c[c] for c in dict.fromkeys((*wanted, *self._order_names()))]
        base = sa.select(*selected).where(*filters).order_by(*order).limit(self.page_size + 1)
        last: tuple[Any, ...] | None = None
        index = 0
        while True:
            query = base if last is None else base.where(self._after(order, last))
            rows = self._read(engine, query, index)
            if not rows:
                return
            records, extra = rows[: self.page_size], rows[self.page_size :]
            last = self._cursor(records[-1])
            if extra and self._cursor(extra[0]) == last:
                raise self._tie_error(index)
            first = self._cursor(records[0])[0]
            keys = f"{jsonable(first)}..{jsonable(last[0])}"
            # For logs and errors: a key may be personal data (an email).
            label = f"{self.name}: {self.key_column} {mask_personal_data(keys)}"
            yield Page(index, [self._record(row, wanted) for row in records], label)
            if not extra:
                return
            index += 1

    # -- SQL -------------------------------------------------------------------------------

    def _order_names(self) -> tuple[str, ...]:
        if self.tiebreak_column is None:
            return (self.key_column,)
        return (self.key_column, self.tiebreak_column)

    def _cursor(self, row: sa.Row[Any]) -> tuple[Any, ...]:
        return tuple(row._mapping[c] for c in self._order_names())

    def _after(self, order: Sequence[sa.ColumnElement[Any]], last: tuple[Any, ...]) -> Any:
        if len(order) == 1:
            return order[0] > last[0]
        # Row-value comparison: PostgreSQL and SQLite (>= 3.15) both have it, and use the index.
        return sa.tuple_(*order) > sa.tuple_(*last)

    def _record(self, row: sa.Row[Any], wanted: Sequence[str]) -> dict[str, Any]:
        mapping = row._mapping
        return {c: jsonable(mapping[c]) for c in (*wanted, *self._order_names())}

    def _reflect(self, conn: sa.Connection, index: int) -> sa.FromClause:
        """The table (reflected) or query (as a subquery) with its columns checked."""
        if self.table is not None:
            schema, _, table_name = self.table.rpartition(".")
            try:
                source: sa.FromClause = sa.Table(
                    table_name, sa.MetaData(), schema=schema or None, autoload_with=conn
                )
            except NoSuchTableError:
                raise self._missing_table(conn, schema or None) from None
            except SQLAlchemyError as exc:
                raise_unchained(self._db_error(index, exc, "check table= and the database"))
        elif isinstance(self.query, SelectBase):
            source = self.query.subquery(_SUBQUERY)
        else:
            sql = str(self.query)
            probe = sa.text(f"SELECT * FROM ({sql}) AS {_SUBQUERY} LIMIT 0")
            try:
                names = list(conn.execute(probe).keys())
            except SQLAlchemyError as exc:
                raise_unchained(self._db_error(index, exc, "check the SQL of query="))
            source = sa.text(sql).columns(*(sa.column(n) for n in names)).subquery(_SUBQUERY)
        known = set(source.c.keys())
        named = [("columns", c) for c in self.columns or ()] + [
            ("key_column", self.key_column),
            ("tiebreak_column", self.tiebreak_column),
            ("partition_column", self.partition_column),
        ]
        for option, name in named:
            if name is not None and name not in known:
                raise self._error(
                    None,
                    f"{option} names {name!r}, which the {'table' if self.table else 'query'}"
                    f" does not have (it has {', '.join(sorted(known))})",
                    f"set {option} to one of those columns",
                )
        return source

    def _filters(self, source: sa.FromClause, partition_key: str | None) -> list[Any]:
        if self.partition_column is None:
            return []
        if partition_key is None:
            raise self._error(
                None,
                f"partition_column={self.partition_column!r} is set but the run has no "
                "partition key",
                "partition the flow, or remove partition_column",
            )
        col = source.c[self.partition_column]
        try:
            return [partition_condition(col, partition_key)]
        except (ValueError, InvalidOperation):
            raise self._error(
                None,
                f"the partition key {partition_key!r} is not a valid {col.type} for "
                f"partition_column={self.partition_column!r}",
                "use partition keys in the column's format (e.g. 2024-01-31 for a date)",
            ) from None

    def _check_no_null_keys(
        self, conn: sa.Connection, source: sa.FromClause, order: list[Any], filters: list[Any]
    ) -> None:
        # `key > :last` never matches NULL: such rows would be silently lost.
        nullable = [c for c in order if getattr(c, "nullable", True)]  # text(): unknown
        if not nullable:
            return
        query = sa.select(sa.true()).select_from(source).where(*filters)
        query = query.where(sa.or_(*(c.is_(None) for c in nullable))).limit(1)
        try:
            found = conn.execute(query).first()
        except SQLAlchemyError as exc:
            raise_unchained(self._db_error(0, exc, "check the source and the database"))
        if found is not None:
            raise self._error(
                0,
                f"some rows have a NULL {' or '.join(c.name for c in nullable)}, which keyset "
                "pagination cannot order",
                "filter them out in query=, or use a NOT NULL key_column/tiebreak_column",
            )

    def _read(self, engine: sa.Engine, query: sa.Select[Any], index: int) -> list[sa.Row[Any]]:
        with self._connect(engine, index) as conn:
            try:
                return list(conn.execute(query).fetchall())
            except SQLAlchemyError as exc:
                raise_unchained(self._db_error(index, exc, "check the source and the database"))

    def _connect(self, engine: sa.Engine, index: int) -> sa.Connection:
        """A connection; a failed connect is retried with backoff and jitter."""

        def give_up(exc: Exception, attempts: int, elapsed: float) -> Exception:
            return self._db_error(
                index,
                exc,
                "check that the database server is running and reachable, and the "
                "URL's host, port, user and password",
                f" (cannot connect, {attempts} attempts in {elapsed:.1f}s)",
            )

        return connect_with_retry(engine, self.connect_retry_seconds, give_up)

    def _resolved_url(self) -> str:
        url = self._url if self._url is not None else self._url_from_env()
        if sa.make_url(url).get_backend_name() == "sqlite":
            # sqlite3 would create an empty file and report "no such table" instead.
            database = sa.make_url(url).database or ""
            if not Path(database).expanduser().is_file():
                raise self._error(
                    None, f"the SQLite file {database} does not exist", "check the URL's path"
                )
        return url

    def _url_from_env(self) -> str:
        assert self._env_var is not None
        raw = os.environ.get(self._env_var, "").strip()
        if not raw:
            raise self._error(
                None,
                f"the environment variable {self._env_var} is not set",
                f"set {self._env_var} to the database URL",
            )
        try:
            return normalize_url(raw, self._env_var)
        except ConfigurationError as exc:
            raise self._error(None, str(exc), f"fix {self._env_var}") from None

    # -- errors ----------------------------------------------------------------------------

    def _where(self) -> str:
        return f"${self._env_var}" if self._env_var is not None else redacted(self._url or "")

    def _error(self, index: int | None, problem: str, fix: str) -> SourceError:
        page = "" if index is None else f", page {index}"
        return SourceError(
            f"Source {self.name!r}{page} ({self._where()}): {problem.rstrip('.')}. Fix: {fix}."
        )

    def _db_error(self, index: int, exc: Exception, fix: str, context: str = "") -> SourceError:
        """The driver's error (``driver_message``): raise it unchained, as ``exc`` quotes keys."""
        name = type(driver_error(exc)).__name__
        return self._error(index, f"{name}{context}: {driver_message(exc)}", fix)

    def _missing_table(self, conn: sa.Connection, schema: str | None) -> SourceError:
        try:
            inspector = sa.inspect(conn)
            names = sorted(
                inspector.get_table_names(schema=schema) + inspector.get_view_names(schema=schema)
            )
        except SQLAlchemyError:
            names = []
        where = f"schema {schema!r}" if schema else "the default schema"
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        return self._error(
            None,
            f"table {self.table!r} not found in {where} (it has: {shown or 'no tables'})",
            "check table= (use 'schema.table' for another schema) and the database URL",
        )

    def _tie_error(self, index: int) -> SourceError:
        """Rows tie on the order across a page's end. The values are not shown: a key may be
        personal data (an email), and the page's position finds the rows."""
        names = ", ".join(self._order_names())
        order = names if self.tiebreak_column is None else f"({names})"
        fix = (
            "make key_column unique, or pass tiebreak_column= a column that is unique among "
            f"rows with the same {self.key_column} (e.g. the primary key)"
            if self.tiebreak_column is None
            else f"pass a tiebreak_column that is unique among rows with the same {names}"
        )
        return self._error(
            index,
            f"several rows share one {order} across the end of the page; keyset pagination"
            " would skip some of them",
            fix,
        )
