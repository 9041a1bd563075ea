"""Credentials of HttpJsonSource go to the origin (scheme, host, port) of its url only: on
next links and on redirects alike, never from https down to http. Real HTTP servers on
127.0.0.1; a second server (another port: another origin) plays the foreign host, and the
headers each server received are checked. Nothing faked."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from requests.auth import AuthBase

from flow_assets.errors import FlowDefinitionError, SourceError
from flow_assets.sources import (
    BasePaginator,
    BearerAuth,
    HeaderAuth,
    HeaderLinkPaginator,
    HttpJsonSource,
    JSONLinkPaginator,
)
from flow_assets.sources.http_limits import HttpProblem
from flow_assets.sources.http_session import Origin, origin_of
from tests.httpfixture import ServedApi, serve_records

pytestmark = pytest.mark.services

RECORDS = [{"id": i} for i in range(25)]
TOKEN = "tok-3e1f-very-secret"
TENANT = "tenant-77aa-secret"  # a key the user put in headers=
AUTHS = {
    "bearer": (lambda: BearerAuth(TOKEN), "authorization"),
    "header": (lambda: HeaderAuth("X-API-Key", TOKEN), "x-api-key"),
}
CREDENTIAL_HEADERS = {"authorization", "x-api-key", "x-tenant-key", "cookie"}


def source(
    url: str, auth: AuthBase, paginator: BasePaginator | None = None, **kwargs: Any
) -> HttpJsonSource:
    return HttpJsonSource(
        url,
        paginator=paginator or JSONLinkPaginator(),
        records_path="items",
        auth=auth,
        headers={"X-Tenant-Key": TENANT, "Accept": "application/json"},
        max_retries=0,
        name="orders",
        **kwargs,
    )


def read_all(src: HttpJsonSource) -> list[Any]:
    return [record for page in src.pages(None) for record in page.records]


def received(api: ServedApi) -> list[set[str]]:
    """The credential headers each request to ``api`` carried, in order."""
    return [{h.lower() for h in r.headers} & CREDENTIAL_HEADERS for r in api.requests]


@contextmanager
def two_origins(style: str = "json_link") -> Iterator[tuple[ServedApi, ServedApi]]:
    """The source's server and a foreign one (same host, another port)."""
    with (
        serve_records(RECORDS, 10, style=style) as home,
        serve_records(RECORDS, 10, style="json_link") as other,
    ):
        yield home, other


def link_away(home: ServedApi, other: ServedApi, style: str) -> None:
    """Page 0 of ``home`` links to page 1 on ``other`` (which serves pages 1 and 2)."""
    link_to(home, f"{other}/orders?page=1", style)


def link_to(home: ServedApi, target: str, style: str) -> None:
    """Page 0 of ``home`` links to ``target``, in the body or in the Link header."""
    if style == "json_link":
        home.inject(body=json.dumps({"items": RECORDS[:10], "next": target}))
    else:
        home.inject(headers={"Link": f'<{target}>; rel="next"'})


def redirect_away(home: ServedApi, location: str) -> None:
    home.inject(status=302, headers={"Location": location}, body="")


def assert_names_both_origins(error: SourceError, home: ServedApi, other: str) -> None:
    message = str(error)
    assert f"another origin, {origin_of(other)}, than the source's, {origin_of(home)}" in message
    assert "Fix: set cross_origin='drop_credentials'" in message
    assert TOKEN not in message and TENANT not in message


@pytest.mark.parametrize("auth", sorted(AUTHS))
@pytest.mark.parametrize("style", ["json_link", "link_header"])
def test_a_next_link_to_another_origin_fails_by_default(style: str, auth: str) -> None:
    with two_origins(style) as (home, other):
        link_away(home, other, style)
        paginator = JSONLinkPaginator() if style == "json_link" else HeaderLinkPaginator()
        src = source(home + "/orders", AUTHS[auth][0](), paginator)
        with pytest.raises(SourceError, match=r"'orders', page 1 .*the next link leads") as caught:
            read_all(src)
        assert_names_both_origins(caught.value, home, other)
        assert other.requests == []  # nothing was sent there, with or without credentials
        assert received(home) == [{AUTHS[auth][1], "x-tenant-key"}]


@pytest.mark.parametrize("auth", sorted(AUTHS))
def test_drop_credentials_follows_a_link_away_without_any_credential(auth: str) -> None:
    with two_origins() as (home, other):
        link_away(home, other, "json_link")
        src = source(home + "/orders", AUTHS[auth][0](), cross_origin="drop_credentials")
        assert read_all(src) == RECORDS  # page 0 at home, pages 1 and 2 at the other origin
        assert received(other) == [set(), set()]
        assert received(home) == [{AUTHS[auth][1], "x-tenant-key"}]
        assert all(r.headers.get("Accept") != "application/json" for r in other.requests)


@pytest.mark.parametrize("auth", sorted(AUTHS))
def test_a_redirect_to_another_origin_fails_by_default(auth: str) -> None:
    # requests itself strips only Authorization on such a redirect: X-API-Key went along.
    with two_origins() as (home, other):
        redirect_away(home, f"{other}/orders")
        with pytest.raises(SourceError, match=r"page 0 .*a redirect \(HTTP 302 from ") as caught:
            read_all(source(home + "/orders", AUTHS[auth][0]()))
        assert_names_both_origins(caught.value, home, other)
        assert other.requests == []


@pytest.mark.parametrize("auth", sorted(AUTHS))
def test_a_redirect_to_another_origin_in_drop_mode_carries_no_credential(auth: str) -> None:
    with two_origins() as (home, other):
        redirect_away(home, f"{other}/orders")
        src = source(home + "/orders", AUTHS[auth][0](), cross_origin="drop_credentials")
        assert read_all(src) == RECORDS  # the next links are relative to where it landed
        assert received(home) == [{AUTHS[auth][1], "x-tenant-key"}]
        assert received(other) == [set(), set(), set()]


def test_a_redirect_within_the_origin_keeps_the_credentials() -> None:
    with two_origins() as (home, _other):
        redirect_away(home, "/v2/orders")
        assert read_all(source(home + "/orders", BearerAuth(TOKEN))) == RECORDS
        assert [r.path for r in home.requests] == [
            "/orders",
            "/v2/orders",
            "/v2/orders",
            "/v2/orders",
        ]
        assert all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in home.requests)


def test_redirects_are_capped() -> None:
    with two_origins() as (home, _other):
        home.inject(status=302, headers={"Location": "/loop"}, body="", times=None)
        with pytest.raises(SourceError, match="more than 10 redirects"):
            read_all(source(home + "/orders", BearerAuth(TOKEN)))
        assert len(home.requests) == 11


def test_cookies_go_to_their_origin_only() -> None:
    # A cookie is scoped to a host, not a port: requests would send it to the other server,
    # and keep one the other server planted for the source's.
    with two_origins() as (home, other):
        home.inject(headers={"Set-Cookie": "session=sess-5ecret; Path=/"})
        away = {"items": RECORDS[10:20], "next": f"{other}/orders?page=2"}
        home.inject(query={"page": "1"}, body=json.dumps(away))
        back = {"items": RECORDS[20:], "next": f"{home}/orders?page=3"}
        other.inject(body=json.dumps(back), headers={"Set-Cookie": "planted=1; Path=/"})
        src = source(home + "/orders", BearerAuth(TOKEN), cross_origin="drop_credentials")
        assert read_all(src) == RECORDS
        assert received(other) == [set()]
        assert [r.query.get("page") for r in home.requests] == [None, "1", "3"]
        assert [r.headers.get("Cookie") for r in home.requests[1:]] == ["session=sess-5ecret"] * 2


@pytest.mark.parametrize("cross_origin", ["fail", "drop_credentials"])
@pytest.mark.parametrize("how", ["link", "redirect", "redirect_same_port"])
def test_https_never_steps_down_to_http(
    how: str, cross_origin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (
        serve_records(RECORDS, 10, style="json_link", tls=True) as home,
        serve_records(RECORDS, 10) as plain,
    ):
        assert home.ca_file is not None and home.startswith("https://")
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", home.ca_file)
        if how == "link":
            link_away(home, plain, "json_link")
        elif how == "redirect":
            redirect_away(home, f"{plain}/orders")
        else:  # the very same host and port, only the scheme changes
            redirect_away(home, home.replace("https://", "http://") + "/orders")
        src = source(home + "/orders", HeaderAuth("X-API-Key", TOKEN), cross_origin=cross_origin)
        with pytest.raises(SourceError, match="leads from https down to http") as caught:
            read_all(src)
        assert "Fix: have the API link and redirect to https URLs" in str(caught.value)
        assert TOKEN not in str(caught.value)
        assert plain.requests == [] and len(home.requests) == 1


def test_https_source_reads_over_tls_with_its_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    with serve_records(RECORDS, 10, style="json_link", tls=True) as home:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(home.ca_file))
        assert read_all(source(home + "/orders", BearerAuth(TOKEN))) == RECORDS
        assert received(home) == [{"authorization", "x-tenant-key"}] * 3


@pytest.mark.parametrize(
    ("url", "other", "same"),
    [
        ("https://API.test/v1", "https://api.test:443/v2?x=1", True),
        ("http://api.test/v1", "http://user:pw@api.test:80/", True),
        ("http://api.test/v1", "https://api.test/v1", False),  # an upgrade is another origin
        ("http://api.test/v1", "http://api.test:8080/v1", False),
        ("http://api.test/v1", "http://www.api.test/v1", False),
        ("http://[::1]:8080/v1", "http://[::1]:8080/v2", True),
    ],
)
def test_origins(url: str, other: str, same: bool) -> None:
    assert (origin_of(url) == origin_of(other)) is same


def test_cross_origin_is_checked_at_definition() -> None:
    with pytest.raises(FlowDefinitionError, match="cross_origin must be one of"):
        HttpJsonSource("http://api.test/x", paginator=JSONLinkPaginator(), cross_origin="allow")


def smuggling_link(home: ServedApi, other: ServedApi, odd: str = "\\") -> str:
    """``http://OTHER<odd>@HOME/orders?page=1``: urllib reads it as HOME's (user information
    "127.0.0.1:OTHER\\"), requests and urllib3 as OTHER's (a backslash ends the host)."""
    return f"{other}{odd}@{home.split('//')[1]}/orders?page=1"


@pytest.mark.parametrize("cross_origin", ["fail", "drop_credentials"])
@pytest.mark.parametrize("style", ["json_link", "link_header"])
def test_a_backslash_in_a_next_link_cannot_take_credentials_elsewhere(
    style: str, cross_origin: str
) -> None:
    # The old check passed the link as the source's origin: the other server got the
    # Authorization and X-Tenant-Key of every page from there on.
    with two_origins(style) as (home, other):
        link_to(home, smuggling_link(home, other), style)
        paginator = JSONLinkPaginator() if style == "json_link" else HeaderLinkPaginator()
        src = source(home + "/orders", BearerAuth(TOKEN), paginator, cross_origin=cross_origin)
        with pytest.raises(SourceError) as caught:
            read_all(src)
        assert other.requests == []
        assert len(home.requests) == 1
    message = str(caught.value)
    assert "page 1 " in message and "its host part holds a backslash" in message
    assert "Fix: have the API send well-formed http(s) links" in message
    assert TOKEN not in message and TENANT not in message


@pytest.mark.parametrize("odd", [" ", "\x7f", "\u3000"])
def test_white_space_or_a_control_character_in_a_link_host_is_refused(odd: str) -> None:
    # Parsers disagree on such hosts. (Tabs and newlines are dropped by urljoin already:
    # the link checked and sent holds none.)
    with two_origins() as (home, other):
        link_to(home, smuggling_link(home, other, odd), "json_link")
        src = source(home + "/orders", BearerAuth(TOKEN), cross_origin="drop_credentials")
        with pytest.raises(SourceError, match="white space or a control character"):
            read_all(src)
        assert other.requests == []


def test_a_backslash_in_a_redirect_goes_where_it_is_checked() -> None:
    # requests quotes a Location's backslash (%5C): user information, the host is home's.
    with two_origins() as (home, other):
        redirect_away(home, smuggling_link(home, other))
        assert read_all(source(home + "/orders", BearerAuth(TOKEN))) == RECORDS[10:]
        assert other.requests == []
        assert [r.query.get("page") for r in home.requests] == [None, "1", "2"]


def test_the_origin_is_that_of_the_url_requests_sends() -> None:
    assert origin_of("http://a.test:1%5C@b.test:2/x") == Origin("http", "b.test", 2)
    assert origin_of("http://[::1]:8080/") == Origin("http", "::1", 8080)
    assert origin_of("http://BÜCHER.test/").host == "xn--bcher-kva.test"
    with pytest.raises(HttpProblem, match="holds a backslash"):
        origin_of("http://a.test:1\\@b.test:2/x")
    with pytest.raises(
        FlowDefinitionError, match=r"url http://a.test:\*\*\*@b.test:2/x: .*holds a backslash"
    ):
        source("http://a.test:1\\@b.test:2/x", BearerAuth(TOKEN))
