"""SqlSource (flow_assets/sources/sql.py) against real PostgreSQL and SQLite databases (a fresh
one per test, from tests/conftest.py); nothing is faked."""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Iterator
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import dagster as dg
import pytest
from sqlalchemy import (
    Column,
    Date,
    DateTime,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    create_engine,
    insert,
    select,
    text,
)
from sqlalchemy.engine import make_url

from flow_assets.errors import FlowDefinitionError, SourceError
from flow_assets.sources import Source
from flow_assets.sources.base import PageRef
from flow_assets.sources.sql import SqlSource, dispose_engines

pytestmark = pytest.mark.services

GAPPY_IDS = [3, 4, 9, 10, 11, 40, 41, 100, 101, 102, 1000, 5000]
PASSWORD = "s3cret-pw"


@pytest.fixture
def db(database_url: str) -> Iterator[Engine]:
    """An engine on the test's fresh database, for setting up tables."""
    engine = create_engine(database_url)
    yield engine
    engine.dispose()
    dispose_engines()


def items_table(engine: Engine, ids: list[int], name: str = "items", **kw: Any) -> Table:
    """``name`` with the given (gappy, shuffled) ids, a label, and a day partition column."""
    table = Table(
        name,
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("label", String(20)),
        Column("day", Date),
        **kw,
    )
    table.create(engine)
    rows = [
        {"id": i, "label": f"item-{i}", "day": date(2024, 1, 1 + i % 2)}
        for i in sorted(ids, key=lambda i: (i * 7919) % 13)  # inserted out of key order
    ]
    if rows:
        with engine.begin() as conn:
            conn.execute(insert(table), rows)
    return table


def read(source: SqlSource, partition_key: str | None = None) -> list[list[Any]]:
    """Each page's ids, asserting indexes run 0..n-1."""
    pages = list(source.pages(partition_key))
    assert [p.index for p in pages] == list(range(len(pages)))
    return [[r["id"] for r in p.records] for p in pages]


def with_password(url: str) -> str:
    """``url`` with a password (the test PostgreSQL trusts local users and ignores it)."""
    return make_url(url).set(password=PASSWORD).render_as_string(hide_password=False)


# -- pagination ---------------------------------------------------------------------------


def test_gaps_in_the_key_are_read_in_order_once(db: Engine, database_url: str) -> None:
    items_table(db, GAPPY_IDS)
    source = SqlSource(database_url, table="items", key_column="id", page_size=5)
    assert isinstance(source, Source)
    assert source.plan(None) is None
    pages = read(source)
    assert pages == [GAPPY_IDS[0:5], GAPPY_IDS[5:10], GAPPY_IDS[10:]]


@pytest.mark.parametrize(
    ("page_size", "expected_pages"),
    [(1, 12), (4, 3), (6, 2), (12, 1), (13, 1), (1000, 1)],
    ids=["one", "exact-multiple-3", "exact-multiple-2", "exact-size", "size+1", "larger"],
)
def test_page_sizes(db: Engine, database_url: str, page_size: int, expected_pages: int) -> None:
    items_table(db, GAPPY_IDS)
    pages = read(SqlSource(database_url, table="items", key_column="id", page_size=page_size))
    assert len(pages) == expected_pages
    assert all(len(p) == page_size for p in pages[:-1])
    assert [i for p in pages for i in p] == GAPPY_IDS


def test_empty_table_yields_no_page(db: Engine, database_url: str) -> None:
    items_table(db, [])
    assert read(SqlSource(database_url, table="items", key_column="id", page_size=3)) == []


def test_records_are_plain_json_friendly_dicts(db: Engine, database_url: str) -> None:
    table = Table(
        "typed",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("at", DateTime(timezone=False)),
        Column("amount", Numeric(10, 2)),
        Column("blob", LargeBinary),
        Column("note", String(10)),
    )
    table.create(db)
    row = {
        "id": 1,
        "at": datetime(2024, 5, 6, 7, 8, 9),
        "amount": Decimal("12.30"),
        "blob": b"\x00\xff",
        "note": None,
    }
    with db.begin() as conn:
        conn.execute(insert(table), [row])
    (page,) = SqlSource(database_url, table="typed", key_column="id").pages(None)
    assert page.records == [
        {"id": 1, "at": "2024-05-06T07:08:09", "amount": "12.30", "blob": "AP8=", "note": None}
    ]


def test_columns_limit_the_record_and_always_include_the_key(db: Engine, database_url: str) -> None:
    items_table(db, [1, 2])
    source = SqlSource(database_url, table="items", key_column="id", columns=["label"])
    (page,) = source.pages(None)
    assert page.records == [{"label": "item-1", "id": 1}, {"label": "item-2", "id": 2}]


def test_pages_are_the_same_on_every_read(db: Engine, database_url: str) -> None:
    items_table(db, GAPPY_IDS)
    source = SqlSource(database_url, table="items", key_column="id", page_size=5)
    first = list(source.pages(None))
    # A copy, as another process would build it, reads the same pages.
    again = list(pickle.loads(pickle.dumps(source)).pages(None))
    assert first == again
    assert first[1].label == "items: id 40..102"


# -- ties in the key ----------------------------------------------------------------------


def tied_table(engine: Engine) -> list[tuple[int, int]]:
    """``events(grp, seq)``: several rows per ``grp``; (grp, seq) is unique."""
    table = Table(
        "events",
        MetaData(),
        Column("grp", Integer, nullable=False),
        Column("seq", Integer, nullable=False),
    )
    table.create(engine)
    pairs = [(g, s) for g in (1, 2, 5, 9) for s in range(3)]
    with engine.begin() as conn:
        conn.execute(insert(table), [{"grp": g, "seq": s} for g, s in reversed(pairs)])
    return sorted(pairs)


@pytest.mark.parametrize("page_size", [1, 2, 4, 100])
def test_ties_are_read_once_with_a_tiebreak_column(
    db: Engine, database_url: str, page_size: int
) -> None:
    pairs = tied_table(db)
    source = SqlSource(
        database_url,
        table="events",
        key_column="grp",
        tiebreak_column="seq",
        page_size=page_size,
    )
    got = [(r["grp"], r["seq"]) for page in source.pages(None) for r in page.records]
    assert got == pairs


def test_a_tie_across_a_page_boundary_without_tiebreak_raises(
    db: Engine, database_url: str
) -> None:
    tied_table(db)
    source = SqlSource(database_url, table="events", key_column="grp", page_size=2)
    with pytest.raises(SourceError) as caught:
        list(source.pages(None))
    message = str(caught.value)
    assert "Source 'events', page 0" in message
    assert "several rows share one grp across the end of the page" in message
    assert "(1)" not in message  # no key value: keys may be personal data
    assert "tiebreak_column=" in message


def test_a_tie_error_does_not_print_the_key_values(db: Engine, database_url: str) -> None:
    table = Table("people", MetaData(), Column("email", String(60)), Column("n", Integer))
    table.create(db)
    with db.begin() as conn:
        conn.execute(insert(table), [{"email": "ann@example.com", "n": n} for n in range(3)])
    source = SqlSource(database_url, table="people", key_column="email", page_size=2)
    with pytest.raises(SourceError) as caught:
        list(source.pages(None))
    assert "several rows share one email across the end of the page" in str(caught.value)
    assert "ann@example.com" not in str(caught.value)


@pytest.mark.parametrize("page_size", [3, 6])
def test_ties_inside_one_page_are_safe_and_allowed(
    db: Engine, database_url: str, page_size: int
) -> None:
    pairs = tied_table(db)
    # Pages of 3 or 6 end exactly where grp changes (3 rows each): nothing can be skipped.
    source = SqlSource(database_url, table="events", key_column="grp", page_size=page_size)
    got = sorted((r["grp"], r["seq"]) for page in source.pages(None) for r in page.records)
    assert got == pairs


def test_a_null_key_raises_instead_of_losing_the_row(db: Engine, database_url: str) -> None:
    table = Table("nullable", MetaData(), Column("k", Integer), Column("v", String(5)))
    table.create(db)
    with db.begin() as conn:
        conn.execute(insert(table), [{"k": 1, "v": "a"}, {"k": None, "v": "b"}])
    source = SqlSource(database_url, table="nullable", key_column="k")
    with pytest.raises(SourceError, match="NULL k"):
        list(source.pages(None))


# -- queries and partitions ---------------------------------------------------------------


def test_a_sql_string_query(db: Engine, database_url: str) -> None:
    items_table(db, GAPPY_IDS)
    source = SqlSource(
        database_url,
        # '%' and ':' in literals must survive the text() wrapping on both drivers.
        query="SELECT id * 2 AS doubled, label FROM items WHERE id >= 10"
        " AND label LIKE 'item-%' AND label <> 'a:b';",
        key_column="doubled",
        page_size=4,
    )
    got = [r["doubled"] for page in source.pages(None) for r in page.records]
    assert got == [2 * i for i in GAPPY_IDS if i >= 10]
    shown = str(source)
    assert 'query="SELECT id * 2 AS doubled, label FROM items WHERE' in shown
    assert shown.endswith("...\", key='doubled', page_size=4)")  # long SQL is cut


def test_a_sqlalchemy_select_query(db: Engine, database_url: str) -> None:
    table = items_table(db, GAPPY_IDS)
    query = select(table.c.id.label("item_id"), table.c.label).where(table.c.id < 100)
    source = SqlSource(database_url, query=query, key_column="item_id", page_size=3)
    pages = list(source.pages(None))
    assert [r["item_id"] for p in pages for r in p.records] == [i for i in GAPPY_IDS if i < 100]
    assert pages[0].records[0] == {"item_id": 3, "label": "item-3"}


@pytest.mark.parametrize("kind", ["table", "sql", "select"])
def test_the_partition_key_filters_rows(db: Engine, database_url: str, kind: str) -> None:
    table = items_table(db, GAPPY_IDS)
    # Odd ids are on 2024-01-02, even ids on 2024-01-01.
    options: dict[str, dict[str, Any]] = {
        "table": {"table": "items"},
        "sql": {"query": "SELECT id, label, day FROM items"},
        "select": {"query": select(table)},
    }
    source = SqlSource(
        database_url, key_column="id", partition_column="day", page_size=2, **options[kind]
    )
    odd = [i for p in read(source, "2024-01-02") for i in p]
    even = [i for p in read(source, "2024-01-01") for i in p]
    assert odd == [i for i in GAPPY_IDS if i % 2]
    assert even == [i for i in GAPPY_IDS if not i % 2]
    assert read(source, "2023-12-31") == []


def test_partition_errors_are_clear(db: Engine, database_url: str) -> None:
    items_table(db, [1])
    source = SqlSource(database_url, table="items", key_column="id", partition_column="day")
    with pytest.raises(SourceError, match="the run has no partition key"):
        list(source.pages(None))
    with pytest.raises(SourceError, match="'not-a-day' is not a valid DATE"):
        list(source.pages("not-a-day"))


# -- errors -------------------------------------------------------------------------------


def test_an_unknown_table_names_it_and_lists_the_tables(db: Engine, database_url: str) -> None:
    items_table(db, [1])
    source = SqlSource(database_url, table="itemz", key_column="id")
    with pytest.raises(SourceError) as caught:
        list(source.pages(None))
    message = str(caught.value)
    assert "table 'itemz' not found" in message
    assert "it has: items" in message
    assert "Fix: check table=" in message


def test_a_schema_qualified_table(db: Engine, database_url: str) -> None:
    schema = "main" if database_url.startswith("sqlite") else "sales"
    if schema == "sales":
        with db.begin() as conn:
            conn.execute(text("CREATE SCHEMA sales"))
    items_table(db, [5, 7], schema=schema)
    source = SqlSource(database_url, table=f"{schema}.items", key_column="id")
    assert read(source) == [[5, 7]]
    missing = SqlSource(database_url, table=f"{schema}.nope", key_column="id")
    with pytest.raises(SourceError, match=f"table '{schema}.nope' not found in schema"):
        list(missing.pages(None))


def test_an_unknown_column_lists_the_columns(db: Engine, database_url: str) -> None:
    items_table(db, [1])
    source = SqlSource(database_url, table="items", key_column="ident")
    with pytest.raises(SourceError, match=r"key_column names 'ident'.*it has day, id, label"):
        list(source.pages(None))


def test_a_bad_sql_query_is_a_source_error(db: Engine, database_url: str) -> None:
    items_table(db, [1])
    source = SqlSource(database_url, query="SELECT id FROM no_such_table", key_column="id")
    with pytest.raises(SourceError, match="no_such_table") as caught:
        list(source.pages(None))
    assert "Fix: check the SQL of query=" in str(caught.value)


# A column only rows past page 0 fail to compute: page 1's query binds page 0's last key.
FAILING_COLUMN = {
    "postgresql": "SELECT email, CAST(n AS integer) AS n FROM contacts",
    "sqlite": "SELECT email, json_extract(n, '$') AS n FROM contacts",
}


def test_a_failed_read_quotes_no_record_key_and_chains_nothing(
    db: Engine, database_url: str
) -> None:
    """SQLAlchemy's error quotes the keyset parameter (an email); Dagster would store it
    from the SourceError's ``__cause__``. The driver's message is shown, masked."""
    table = Table("contacts", MetaData(), Column("email", String(60), primary_key=True))
    table.append_column(Column("n", String(60)))
    table.create(db)
    with db.begin() as conn:
        conn.execute(insert(table), [{"email": f"c{i}@example.com", "n": "1"} for i in range(4)])
    source = SqlSource(
        database_url, query=FAILING_COLUMN[db.dialect.name], key_column="email", page_size=2
    )
    pages = source.pages(None)
    assert len(next(pages).records) == 2
    with db.begin() as conn:
        conn.execute(text("UPDATE contacts SET n = 'carol@example.com' WHERE email > 'c2'"))
    with pytest.raises(SourceError, match="page 1") as caught:
        next(pages)

    error = caught.value
    assert error.__cause__ is None and error.__context__ is None
    shown = "".join(traceback.format_exception(error))
    assert "@example.com" not in shown and "parameters" not in shown
    if db.dialect.name == "postgresql":
        assert 'invalid input syntax for type integer: "<email>"' in str(error)


def test_a_long_driver_message_is_capped(postgres_url: str) -> None:
    query = f"SELECT CAST('{'x' * 2000}' AS integer) AS id"
    with pytest.raises(SourceError, match="InvalidTextRepresentation") as caught:
        list(SqlSource(postgres_url, query=query, key_column="id").pages(None))
    assert "x[...]. Fix: check the SQL of query=." in str(caught.value)
    assert "x" * 300 not in str(caught.value) and len(str(caught.value)) < 600


def test_a_missing_sqlite_file_is_not_created(tmp_path: Any) -> None:
    path = tmp_path / "absent.db"
    source = SqlSource(f"sqlite:///{path}", table="items", key_column="id")
    with pytest.raises(SourceError, match="does not exist"):
        list(source.pages(None))
    assert not path.exists()


def test_the_password_never_shows(postgres_url: str) -> None:
    url = with_password(postgres_url)
    engine = create_engine(postgres_url)
    try:
        items_table(engine, [1, 2, 3])
    finally:
        engine.dispose()
    source = SqlSource(url, table="nope", key_column="id")
    assert "***" in str(source)
    assert PASSWORD not in str(source)
    assert PASSWORD not in repr(source)
    with pytest.raises(SourceError) as caught:
        list(source.pages(None))
    assert PASSWORD not in str(caught.value)
    assert [1, 2, 3] in read(SqlSource(url, table="items", key_column="id"))
    # A server that is not there: the driver's connection error must not leak it either.
    parsed = make_url(url)
    down = parsed.set(port=1).render_as_string(hide_password=False)
    unreachable = SqlSource(down, table="items", key_column="id", connect_retry_seconds=0)
    with pytest.raises(SourceError, match="cannot connect") as caught:
        list(unreachable.pages(None))
    assert PASSWORD not in str(caught.value)
    assert "***" in str(caught.value)
    dispose_engines()


def test_an_env_var_url_is_read_when_the_source_connects(
    db: Engine, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    items_table(db, [1, 2])
    monkeypatch.delenv("SOURCE_DB_URL", raising=False)
    source = SqlSource(dg.EnvVar("SOURCE_DB_URL"), table="items", key_column="id")
    assert str(source).startswith("SqlSource(EnvVar('SOURCE_DB_URL'), table='items'")
    with pytest.raises(SourceError, match="SOURCE_DB_URL is not set"):
        list(source.pages(None))
    monkeypatch.setenv("SOURCE_DB_URL", database_url)
    assert read(source) == [[1, 2]]


# -- construction (no database needed) -----------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of table= .* and query="),
        ({"table": "t", "query": "SELECT 1"}, "exactly one of table="),
        ({"table": "t", "page_size": 0}, "page_size must be an integer >= 1"),
        ({"table": "t", "tiebreak_column": "id"}, "tiebreak_column must differ"),
        ({"table": "t", "columns": "id"}, "columns must be a list of column names"),
        ({"query": 42}, "query must be a SQLAlchemy select"),
        ({"table": "t", "connect_retry_seconds": -1}, "connect_retry_seconds must be"),
    ],
)
def test_bad_arguments_fail_at_definition(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(FlowDefinitionError, match=message):
        SqlSource("sqlite:////tmp/x.db", key_column="id", **kwargs)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://u:hunter2@h/db", "unsupported database 'mysql'"),
        ("sqlite://", "in-memory SQLite"),
        ("not a url", "not a valid database URL"),
    ],
)
def test_bad_urls_fail_at_definition_without_the_password(url: str, message: str) -> None:
    with pytest.raises(FlowDefinitionError, match=message) as caught:
        SqlSource(url, table="t", key_column="id")
    assert "hunter2" not in str(caught.value)


def test_fetch_is_not_supported() -> None:
    source = SqlSource("sqlite:////tmp/x.db", table="t", key_column="id", name="orders")
    with pytest.raises(SourceError, match="'orders' is sequential and cannot fetch page 3"):
        source.fetch(PageRef(3))


def test_str_shows_a_redacted_url_and_the_query() -> None:
    source = SqlSource(
        "postgresql://app:pw@db:5432/shop",
        table="sales.orders",
        key_column="updated_at",
        tiebreak_column="id",
    )
    assert str(source) == (
        "SqlSource(postgresql+psycopg://app:***@db:5432/shop, table='sales.orders',"
        " key='(updated_at, id)', page_size=1000)"
    )


def test_page_labels_mask_personal_key_values(db: Engine, database_url: str) -> None:
    table = Table("contacts", MetaData(), Column("email", String(60), primary_key=True))
    table.create(db)
    with db.begin() as conn:
        conn.execute(insert(table), [{"email": f"c{n}@example.com"} for n in range(3)])
    source = SqlSource(database_url, table="contacts", key_column="email", page_size=2)
    labels = [page.label for page in source.pages(None)]
    assert labels == ["contacts: email <email>..<email>", "contacts: email <email>..<email>"]
