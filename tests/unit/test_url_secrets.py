"""Passwords holding reserved characters (``/ @ : % # ?``) in FLOW_REDIS_URL and
FLOW_DATABASE_URL: a malformed URL fails at load, naming the setting and the fix, and no
fragment of its user name or password reaches any output (the exception, logging,
``redact_url``/``redact_text``); the same password percent-encoded is accepted and reaches
the client exactly. Hypothesis generates the URLs; no server is involved (the Dagster-run
side is in ``tests/dagster/test_url_secrets_in_runs.py``).

Generated secrets are made of segments of rare letters (no hex digit), each at least 3
long, joined by reserved characters: a leak of any fragment shows up as one of the
segments' 3-letter windows, which no message of this package or Dagster contains.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flow_assets.build import build_definitions
from flow_assets.errors import FlowDefinitionError
from flow_assets.flow import Flow
from flow_assets.sources.files import FileSource
from flow_assets.sources.sql import SqlSource
from resources.errors import ConfigurationError
from resources.ledger import db
from resources.ledger.ledger import Ledger
from resources.live.counters import LiveCounters
from resources.live.embedded_redis import configured_redis_url
from resources.redaction import redact_text, redact_url, userinfo_problem

# Rare letters, none of them a hex digit (run ids and hashes are hex): lower case for
# passwords, upper case for user names, so that a user name shown beside *** is no leak.
RARE = "qzxjkvw"
USER_RARE = "QZXJKVW"
SEGMENT = st.text(alphabet=RARE, min_size=3, max_size=8)
USER = st.text(alphabet=USER_RARE, min_size=3, max_size=8)
# Reserved characters that make a URL ambiguous; ':' alone does not (the first ':' of the
# user information separates the user name, later ones belong to the password).
AMBIGUOUS = "/@%#?"
RESERVED = st.sampled_from(AMBIGUOUS + ":")
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
REDIS_SCHEMES = ["redis", "rediss"]
DATABASE_SCHEMES = ["postgresql+psycopg", "postgresql", "postgres"]


@st.composite
def passwords(draw: st.DrawFn, ambiguous: bool = True) -> str:
    """Segments joined by reserved characters; at least one of / @ % # ? when ambiguous."""
    segments = draw(st.lists(SEGMENT, min_size=2, max_size=4))
    joins = draw(st.lists(RESERVED, min_size=len(segments) - 1, max_size=len(segments) - 1))
    if ambiguous and not set(joins) & set(AMBIGUOUS):
        joins[draw(st.integers(0, len(joins) - 1))] = draw(st.sampled_from(AMBIGUOUS))
    return segments[0] + "".join(j + s for j, s in zip(joins, segments[1:], strict=True))


def fragments(*secrets: str) -> set[str]:
    """Every 3-letter window of every segment of the secrets."""
    found: set[str] = set()
    for secret in secrets:
        for segment in "".join(c if c in RARE + USER_RARE else " " for c in secret).split():
            found.update(segment[i : i + 3] for i in range(len(segment) - 2))
    return found


def assert_clean(text: str, *secrets: str) -> None:
    leaked = sorted(f for f in fragments(*secrets) if f in text)
    assert not leaked, f"fragments {leaked} of the secret in: {text!r}"


@contextmanager
def env(name: str, value: str) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(name, value)
        yield


def a_flow() -> Flow:
    return Flow(
        name="orders",
        source=FileSource("/nonexistent/orders.jsonl"),
        key="id",
        handler=lambda batch: None,
    )


def load_error(call: object) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def assert_names_setting_and_fix(error: ConfigurationError, setting: str) -> None:
    message = str(error)
    assert setting in message, message
    assert "percent-encode reserved characters in the user name and password" in message
    assert "/ is %2F" in message and "@ is %40" in message and "% is %25" in message
    assert error.__cause__ is None and error.__context__ is None  # no parser error chained


# ------------------------------------------------------------------- malformed: rejected


@SETTINGS
@given(
    scheme=st.sampled_from(REDIS_SCHEMES),
    user=st.one_of(st.just(""), USER),
    password=passwords(),
)
@example(scheme="redis", user="", password="qzx/jkv")  # the "Port ... 'S3cret'"
def test_a_malformed_redis_url_fails_at_load_without_any_fragment(
    scheme: str, user: str, password: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    url = f"{scheme}://{user}:{password}@cache.internal:6379/0"
    assert userinfo_problem(url) is not None

    with env("FLOW_REDIS_URL", url):
        errors = [
            load_error(lambda: build_definitions([a_flow()])),  # the definitions' load
            load_error(lambda: LiveCounters().client()),
            load_error(lambda: configured_redis_url()),
        ]
    errors.append(load_error(lambda: LiveCounters(url=url).redacted_url()))

    for error in errors:
        assert_names_setting_and_fix(error, "FLOW_REDIS_URL")
        assert_clean(str(error), user, password)
    assert_clean(caplog.text, user, password)
    assert_clean(redact_url(url), password)
    assert_clean(redact_text(f"cannot reach {url} (retrying)"), password)


@SETTINGS
@given(
    scheme=st.sampled_from(DATABASE_SCHEMES),
    user=USER,
    password=passwords(),
)
@example(scheme="postgres", user="QZX", password="jkv/wqz")
def test_a_malformed_database_url_fails_at_load_without_any_fragment(
    scheme: str, user: str, password: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    url = f"{scheme}://{user}:{password}@db.internal:5432/flows"

    with env("FLOW_DATABASE_URL", url):
        errors = [
            load_error(lambda: build_definitions([a_flow()])),
            load_error(lambda: Ledger().resolved_url()),
            load_error(lambda: Ledger().redacted_url()),
        ]
    direct = load_error(lambda: Ledger(url=url).resolved_url())

    for error in errors:
        assert_names_setting_and_fix(error, "FLOW_DATABASE_URL")
    assert_names_setting_and_fix(direct, "MetricsStore `url`")
    for error in [*errors, direct]:
        assert_clean(str(error), user, password)
    assert_clean(caplog.text, user, password)
    assert_clean(db.redacted(url), password)
    assert_clean(redact_text(f"connection to {url} failed"), password)


# ------------------------------------------------------------- percent-encoded: accepted


@SETTINGS
@given(scheme=st.sampled_from(REDIS_SCHEMES), password=passwords(ambiguous=False))
@example(scheme="redis", password="qzx/jkv@wqz%zzx#kkk?vvv:www")
def test_the_same_redis_password_percent_encoded_reaches_the_client_exactly(
    scheme: str, password: str
) -> None:
    url = f"{scheme}://app:{quote(password, safe='')}@cache.internal:6379/0"

    counters = LiveCounters(url=url)
    client = counters.client()
    try:
        kwargs = client.connection_pool.connection_kwargs
        assert (kwargs["username"], kwargs["password"]) == ("app", password)
        assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("cache.internal", 6379, 0)
    finally:
        client.close()
    assert counters.redacted_url() == f"{scheme}://app:***@cache.internal:6379/0"
    assert_clean(redact_text(f"cannot reach {url}"), password)


@SETTINGS
@given(password=passwords(ambiguous=False))
@example(password="qzx/jkv@wqz%zzx#kkk?vvv:www")
def test_the_same_database_password_percent_encoded_reaches_the_driver_exactly(
    password: str,
) -> None:
    url = f"postgresql://app:{quote(password, safe='')}@db.internal:5432/flows"

    with env("FLOW_DATABASE_URL", url):
        store = Ledger()
        engine_url = store.engine().url
        assert (engine_url.username, engine_url.password) == ("app", password)
        assert engine_url.drivername == "postgresql+psycopg"
        assert store.redacted_url() == "postgresql+psycopg://app:***@db.internal:5432/flows"
    assert_clean(redact_text(f"connection to {url} failed"), password)


def test_colons_in_a_password_are_unambiguous_and_accepted() -> None:
    url = "redis://app:qzx:jkv:wqz@cache.internal:6379/0"
    assert userinfo_problem(url) is None
    client = LiveCounters(url=url).client()
    try:
        assert client.connection_pool.connection_kwargs["password"] == "qzx:jkv:wqz"
    finally:
        client.close()
    assert_clean(redact_url(url), "qzx:jkv:wqz")
    parsed = db.normalize_url(url.replace("redis://", "postgresql://"), "FLOW_DATABASE_URL")
    assert "qzx%3Ajkv%3Awqz" in parsed


# ----------------------------------------------------------------- the postgres:// alias


def test_postgres_scheme_names_the_variable_and_the_scheme_to_use() -> None:
    url = "postgres://app:qzxjkv@db.internal:5432/flows"
    with env("FLOW_DATABASE_URL", url):
        error = load_error(lambda: build_definitions([a_flow()]))
    message = str(error)
    assert message.startswith("FLOW_DATABASE_URL='postgres://app:***@db.internal:5432/flows'")
    assert "use postgresql+psycopg://" in message
    assert "Can't load plugin" not in message
    assert_clean(message, "qzxjkv")


SECRET_PARAMS = ("client_secret", "private_token", "refresh_token", "auth_token", "x-api-key")


@given(
    name=st.sampled_from(SECRET_PARAMS),
    value=st.text(st.sampled_from("abcXYZ019-_.~%"), min_size=4, max_size=20),
)
def test_query_secrets_are_masked_in_urls_and_in_text(name: str, value: str) -> None:
    """A query parameter whose name ends in a secret word is masked wherever a URL is shown
    (``\\b`` once let ``client_secret`` and friends through)."""
    url = f"https://api.example.com/v1/items?page=2&{name}={value}&per_page=100"
    expected = f"https://api.example.com/v1/items?page=2&{name}=***&per_page=100"
    assert redact_url(url) == expected
    assert redact_text(f"GET {url} returned 500") == f"GET {expected} returned 500"


# ------------------------------------------------- configuration errors quote no password


@SETTINGS
@given(
    scheme=st.sampled_from(DATABASE_SCHEMES + REDIS_SCHEMES),
    user=USER,
    password=passwords(),
    option=st.sampled_from(["source", "handler", "partitions", "schedule"]),
)
@example(scheme="postgresql", user="QZX", password="jkv@wqz", option="source")
def test_a_url_given_to_the_wrong_option_is_not_printed_whole(
    scheme: str, user: str, password: str, option: str
) -> None:
    """``Flow(source="postgresql://app:pw@db/x")`` once printed the URL, password and all."""
    url = f"{scheme}://{user}:{password}@db.internal:5432/flows"
    options: dict[str, object] = {
        "name": "orders",
        "source": FileSource("/nonexistent/orders.jsonl"),
        "key": "id",
        "handler": lambda batch: None,
        option: url,
    }
    with pytest.raises(FlowDefinitionError) as caught:
        Flow(**options)  # type: ignore[arg-type]
    assert f"{option}=" in str(caught.value)
    assert_clean(str(caught.value), password)


@SETTINGS
@given(user=USER, password=passwords())
@example(user="QZX", password="jkv@wqz")  # SQLAlchemy's repr showed "QZX:***@wqz@db"
def test_a_parsed_url_object_given_to_sql_source_shows_no_fragment(
    user: str, password: str
) -> None:
    raw = f"postgresql://{user}:{password}@db.internal:5432/flows"
    try:
        url = sa.make_url(raw)
    except (sa.exc.ArgumentError, ValueError):
        return  # not even a URL object
    with pytest.raises(FlowDefinitionError) as caught:
        SqlSource(url, table="orders", key_column="id")  # type: ignore[arg-type]
    assert_clean(str(caught.value), password)
