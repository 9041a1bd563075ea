"""``redact_text``, the one path of every outward text (errors, logs, Dagster events, ledger
reasons, tags, metadata), as a property: a secret of 4 characters or more never appears in
what it returns, wherever the secret sits - the password of a URL of any scheme (drawn from
all printable ASCII: reserved characters, ``%``, quotes and spaces included), a query
secret, a header (``Authorization: Bearer ...``, ``X-API-Key: ...``), a bare ``Bearer``
token echoed in a body, an assignment (``api_key=...``) or a JSON/Python pair
(``"password": "..."``). Examples pin the readable side: what is not a secret stays.
"""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from resources.redaction import mask_personal_data, redact_text

pytestmark = pytest.mark.unit

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
SECRET = st.text(PRINTABLE, min_size=4, max_size=24)
NO_SPACE_SECRET = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=4)
SCHEME = st.from_regex(r"[a-z][a-z0-9+.\-]{0,12}", fullmatch=True)
USER = st.text("abcdefxyzABC0123456789._-", max_size=8)
HOST = st.sampled_from(["db.internal", "127.0.0.1", "cache", "[::1]", "api.example.com"])
PORT = st.sampled_from(["", ":5432", ":6379", ":443"])
TAIL = st.sampled_from(["", "/", "/flows", "/0", "/v1/items?page=2&per_page=100", "?x=1#top"])
# Where a URL sits in a message: alone, quoted, before a colon or a parenthesis, or beside
# an email address whose '@' a careless parser takes for the end of the user information.
SENTENCES = st.sampled_from(
    [
        "{}",
        "cannot reach {} (retrying)",
        "url='{}'",
        "GET {}: HTTP 500",
        "DSN {} ; next try in 2s",
        "upsert via {} for bob@example.com",
        "cache {} and db postgresql://app:***@db/x",
    ]
)
SECRET_PARAMS = [
    "client_secret",
    "private_token",
    "refresh_token",
    "auth_token",
    "access_token",
    "api_key",
    "x-api-key",
    "password",
    "signature",
]
AUTH_SCHEMES = ["Bearer", "Basic", "Token", "bearer", "Digest", "ApiKey"]
HEADERS = ["X-API-Key", "Api-Key", "X-Auth-Token", "Private-Token", "X-Access-Token", "Cookie"]
PAIR_NAMES = ["password", "passwd", "client_secret", "apiKey", "access_token", "secret"]


def assert_hidden(secret: str, text: str, *forms: str) -> None:
    """The secret (and each form it takes in ``text``, e.g. JSON-escaped) is not in the
    redacted text."""
    out = redact_text(text)
    for form in (secret, *forms):
        assert form not in out, f"{form!r} still in {out!r} (from {text!r})"


def reads_as_a_port(user: str, password: str) -> bool:
    """The one shape no reader can tell apart: ``user:123 rest@host`` reads as the host
    ``user`` and the port ``123`` followed by prose (documented in redaction.py)."""
    return bool(user) and re.match(r"\d+(?:[/?#][^\s@]*)?\s", password) is not None


@SETTINGS
@given(
    scheme=SCHEME,
    user=USER,
    password=SECRET,
    host=HOST,
    port=PORT,
    tail=TAIL,
    sentence=SENTENCES,
)
@example(
    scheme="postgresql", user="app", password="p@ss", host="db", port="", tail="/x", sentence="{}"
)
@example(scheme="redis", user="", password="s3/cr@t", host="cache", port=":6379", tail="/0",
         sentence="{}")  # fmt: skip
@example(scheme="redis", user="", password="@abc def", host="cache", port="", tail="",
         sentence="cannot reach {} (retrying)")  # fmt: skip
@example(scheme="https", user="u", password="ab c://d", host="h", port="", tail="",
         sentence="{}")  # fmt: skip
@example(scheme="s3", user="k", password="a b#c?d e", host="bucket", port="", tail="/key",
         sentence="url='{}'")  # fmt: skip
def test_a_url_password_never_shows(
    scheme: str, user: str, password: str, host: str, port: str, tail: str, sentence: str
) -> None:
    url = f"{scheme}://{user}:{password}@{host}{port}{tail}"
    text = sentence.format(url)
    assume(password not in sentence + host + port + tail + user + scheme)
    assume(not reads_as_a_port(user, password))
    assert_hidden(password, text)


@SETTINGS
@given(
    name=st.sampled_from(SECRET_PARAMS),
    value=st.text(
        st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="&#"), min_size=4
    ),
    host=HOST,
    port=PORT,
    sentence=SENTENCES,
)
def test_a_query_secret_never_shows(
    name: str, value: str, host: str, port: str, sentence: str
) -> None:
    url = f"https://{host}{port}/v1/items?page=2&{name}={value}&per_page=100"
    text = sentence.format(url)
    assume(value not in f"{sentence} https://{host}{port}/v1/items?page=2&per_page=100 {name}")
    assert_hidden(value, text)


@SETTINGS
@given(
    scheme=st.sampled_from(AUTH_SCHEMES),
    token=NO_SPACE_SECRET,
    proxy=st.booleans(),
    layout=st.sampled_from(["line", "block", "json", "repr"]),
)
@example(scheme="Bearer", token="tok-8f3a9c2e", proxy=False, layout="line")
@example(scheme="Basic", token="dXNlcjpwYXNz", proxy=False, layout="block")
def test_an_authorization_header_never_shows(
    scheme: str, token: str, proxy: bool, layout: str
) -> None:
    name = "Proxy-Authorization" if proxy else "Authorization"
    text = headers_text({"Accept": "*/*", name: f"{scheme} {token}", "Host": "h"}, layout)
    assume(token not in text.replace(token, "", 1))
    assert_hidden(token, text, json.dumps(token)[1:-1], repr(token)[1:-1])


@SETTINGS
@given(
    name=st.sampled_from(HEADERS),
    value=NO_SPACE_SECRET,
    layout=st.sampled_from(["line", "block", "json", "repr"]),
)
@example(name="X-API-Key", value="v4lue", layout="line")
def test_a_credential_header_never_shows(name: str, value: str, layout: str) -> None:
    text = headers_text({"Accept": "*/*", name: value, "Host": "h"}, layout)
    assume(value not in text.replace(value, "", 1))
    assert_hidden(value, text, json.dumps(value)[1:-1], repr(value)[1:-1])


def headers_text(headers: dict[str, str], layout: str) -> str:
    """Headers as an error body or a log would echo them."""
    if layout == "json":
        return json.dumps({"error": "unauthorized", "request": {"headers": headers}})
    if layout == "repr":
        return f"request headers: {headers!r}"
    lines = [f"{name}: {value}" for name, value in headers.items()]
    if layout == "block":
        return "GET /v1/items HTTP/1.1\r\n" + "\r\n".join(lines) + "\r\n\r\n"
    return " ".join(["HTTP 401:", *lines])  # an excerpt with its white space collapsed


@SETTINGS
@given(token=st.from_regex(r"[A-Za-z0-9\-._~+/]{4,40}=*", fullmatch=True))
@example(token="tok-1234abcd")
def test_a_bearer_token_echoed_in_a_body_never_shows(token: str) -> None:
    body = json.dumps({"message": f"token Bearer {token} expired", "status": 401})
    assert_hidden(token, f"HTTP 401: {body}")


@SETTINGS
@given(
    name=st.sampled_from(PAIR_NAMES),
    value=SECRET,
    layout=st.sampled_from(["json", "repr", "assign", "quoted_assign"]),
)
@example(name="password", value="s3cr et pass", layout="json")
@example(name="api_key", value="v4lue", layout="assign")
def test_a_secret_pair_never_shows(name: str, value: str, layout: str) -> None:
    if layout == "assign":
        assume(not any(c.isspace() for c in value))
        text = f"retrying with {name}={value} now"
    elif layout == "quoted_assign":
        assume('"' not in value and "\\" not in value)
        text = f'config: {name}="{value}", timeout=30'
    elif layout == "json":
        text = json.dumps({"user": "app", name: value, "n": 3})
    else:
        text = f"payload { ({'user': 'app', name: value})!r}"
    assume(value not in text.replace(value, "", 1))
    assert_hidden(value, text, json.dumps(value)[1:-1], repr(value)[1:-1])


# ------------------------------------------------------------------ what stays readable


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "upsert via postgresql+psycopg://app:pw@db:5432/x (cache redis://:pw@cache:6379/0)",
            "upsert via postgresql+psycopg://app:***@db:5432/x (cache redis://:***@cache:6379/0)",
        ),
        (
            'GET http://127.0.0.1:8080/items?page=1: HTTP 404: {"email": "a@b.example"}',
            'GET http://127.0.0.1:8080/items?page=1: HTTP 404: {"email": "a@b.example"}',
        ),
        ("redis://cache:6379/0 is down", "redis://cache:6379/0 is down"),
        ("Authorization: Bearer tok-123 Accept: */*", "Authorization: Bearer *** Accept: */*"),
        ('{"password": "s3 cr", "n": 1}', '{"password": "***", "n": 1}'),
        ("X-API-Key: v4lue; retry", "X-API-Key: ***; retry"),
        ("record has no key field 'id'", "record has no key field 'id'"),
        ("3 of 60 jobs failed (max_failed_jobs=2)", "3 of 60 jobs failed (max_failed_jobs=2)"),
        ("sqlite:////tmp/flow.db", "sqlite:////tmp/flow.db"),
    ],
)
def test_what_is_not_a_secret_stays_readable(text: str, expected: str) -> None:
    assert redact_text(text) == expected


def test_nul_and_lone_surrogates_are_escaped_so_every_store_takes_the_text() -> None:
    out = redact_text("bad key 'a\x00b' and '\ud800'")
    assert out == "bad key 'a\\u0000b' and '\\ud800'"
    out.encode("utf-8")  # no UnicodeEncodeError


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ("duplicate customer alice@example.com", "alice@example.com"),
        ("call +1 (555) 123-4567 first", "555) 123-4567"),
        ("ssn=123-45-6789", "123-45-6789"),
        ("card 4111 1111 1111 1111 declined", "4111 1111 1111 1111"),
        ("iban DE89 3704 0044 0532 0130 00 closed", "3704 0044"),
        ("session 8f3a9c2e71b04d5f9a0b expired", "8f3a9c2e71b04d5f9a0b"),
        ("member A1234567", "1234567"),
    ],
)
def test_personal_data_is_masked(text: str, hidden: str) -> None:
    assert hidden not in mask_personal_data(text)


@pytest.mark.parametrize(
    "text",
    [
        "ConnectionError: cannot write to postgresql+psycopg://app:***@127.0.0.1:5432/flows",
        "page 3: HTTP 500 after 2 retries",
        "order 42 is late",
    ],
)
def test_what_is_not_personal_stays(text: str) -> None:
    assert mask_personal_data(text) == text


@pytest.mark.parametrize(
    ("text", "secrets", "kept"),
    [
        ("Cookie: a=1; sid=abc123; theme=dark", ["abc123", "dark"], "Cookie: ***"),
        ("Set-Cookie: session=s3ss10n; Path=/", ["s3ss10n"], "Set-Cookie: ***"),
        (
            "GET https://h/x?jwt=eyJhbGci&session=s1x&sid=9z9&code=0auth&zipcode=123",
            ["eyJhbGci", "s1x", "9z9", "0auth"],
            "zipcode=123",
        ),
        ("check the credentials (auth=) and headers=", [], "credentials (auth=) and headers="),
    ],
)
def test_cookies_session_ids_and_codes_are_masked_and_option_names_kept(
    text: str, secrets: list[str], kept: str
) -> None:
    shown = redact_text(text)
    assert all(secret not in shown for secret in secrets), shown
    assert kept in shown
