"""Sources report the record count an API says it holds (``Page.reported_total`` for pages
read in order, ``PageRef.reported_total`` for planned pages), so the finalizer can fail a
run that read fewer records than that. Real HTTP servers on 127.0.0.1, real requests.

The incident: a json-server-like API sends its ``Link`` header only when the request names
a page (``?_page=1``), though every answer says ``X-Total-Count: 2500``. Asked without
``_page`` it answers 100 records and no link, so a ``HeaderLinkPaginator`` read one page.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from flow_assets.errors import FlowDefinitionError, SourceError
from flow_assets.sources import (
    BasePaginator,
    HeaderLinkPaginator,
    HttpJsonSource,
    JSONCursorPaginator,
    JSONLinkPaginator,
    OffsetPaginator,
    PageNumberPaginator,
)
from tests.httpfixture import serve_records

pytestmark = pytest.mark.services

TOTAL = 2500
RECORDS = [{"id": i} for i in range(TOTAL)]
FAST: dict[str, Any] = {"backoff_factor": 0.01, "max_retries": 1}


@dataclass
class JsonServer:
    """A json-server-like API: ``_page``/``_limit`` pagination (default limit 100)."""

    url: str
    total_header: str = "X-Total-Count"
    queries: list[dict[str, str]] = field(default_factory=list)


@contextmanager
def json_server(records: list[Any], *, total_header: str = "X-Total-Count") -> Iterator[JsonServer]:
    """Serve ``records`` the way json-server does: every answer has ``total_header``; the
    ``Link`` header (first, prev, next, last) only when the request names ``_page``;
    without ``_page`` the first ``_limit`` records (100 by default)."""
    server_ref: dict[str, JsonServer] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            api = server_ref["api"]
            api.queries.append(query)
            limit = int(query.get("_limit", 100))
            headers = {api.total_header: str(len(records))}
            if "_page" in query:
                page = int(query["_page"])
                chunk = records[(page - 1) * limit : page * limit]
                last = max(1, -(-len(records) // limit))
                base = f"{api.url}{parts.path}"

                def link(n: int, rel: str) -> str:
                    return f'<{base}?{urlencode({**query, "_page": n})}>; rel="{rel}"'

                links = [link(1, "first")]
                if page > 1:
                    links.append(link(page - 1, "prev"))
                if page < last:
                    links.append(link(page + 1, "next"))
                links.append(link(last, "last"))
                headers["Link"] = ", ".join(links)
            else:
                chunk = records[:limit]
            payload = json.dumps(chunk).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    api = server_ref["api"] = JsonServer(
        f"http://127.0.0.1:{server.server_address[1]}", total_header=total_header
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_link_header_api_without_first_page_reads_one_page_reporting_the_total() -> None:
    with json_server(RECORDS) as api:
        src = HttpJsonSource(api.url + "/items", paginator=HeaderLinkPaginator(), **FAST)
        pages = list(src.pages(None))
    # What happened in the incident: one page of 100 ... but now it says 2500 are there.
    assert [len(p.records) for p in pages] == [100]
    assert [p.reported_total for p in pages] == [TOTAL]


def test_link_header_api_with_its_first_page_named_reads_everything() -> None:
    with json_server(RECORDS) as api:
        src = HttpJsonSource(
            api.url + "/items",
            paginator=HeaderLinkPaginator(),
            params={"_page": 1, "_limit": 100},
            **FAST,
        )
        pages = list(src.pages(None))
    assert [r for p in pages for r in p.records] == RECORDS
    assert len(pages) == 25 and {p.reported_total for p in pages} == {TOTAL}
    # The next links carry every parameter: the first request was the only one built.
    assert api.queries[0] == {"_page": "1", "_limit": "100"}
    assert api.queries[-1] == {"_page": "25", "_limit": "100"}


def test_a_custom_total_header_is_read_and_none_turns_it_off() -> None:
    with json_server(RECORDS[:30], total_header="X-Total") as api:
        params = {"_page": 1, "_limit": 10}
        named = HttpJsonSource(
            api.url, paginator=HeaderLinkPaginator(), params=params, total_header="X-Total"
        )
        assert [p.reported_total for p in named.pages(None)] == [30, 30, 30]
        default = HttpJsonSource(api.url, paginator=HeaderLinkPaginator(), params=params)
        assert [p.reported_total for p in default.pages(None)] == [None, None, None]
    with json_server(RECORDS[:30]) as api:
        off = HttpJsonSource(api.url, paginator=HeaderLinkPaginator(), total_header=None)
        assert [p.reported_total for p in off.pages(None)] == [None]


def test_a_named_total_header_must_hold_a_count() -> None:
    with json_server(RECORDS[:30]) as api:
        src = HttpJsonSource(api.url, paginator=HeaderLinkPaginator(), total_header="Content-Type")
        with pytest.raises(SourceError, match=r"'Content-Type' holds 'application/json'"):
            list(src.pages(None))


# Every paginator reports the total, read in order (pages) or planned (refs).
Case = tuple[str, Callable[[], BasePaginator], dict[str, Any], "int | None"]
SEQUENTIAL: dict[str, Case] = {
    # style, paginator, source options, the total the pages report
    "offset_header_default": ("offset", lambda: OffsetPaginator(limit=10), {}, 25),
    "offset_from_5": ("offset", lambda: OffsetPaginator(limit=10, offset=5), {}, 20),
    "page_number_body_total": ("page_number", PageNumberPaginator, {"total_path": "total"}, 25),
    "page_number_no_total": ("page_number", PageNumberPaginator, {}, None),
    "cursor_no_total": ("cursor", JSONCursorPaginator, {}, None),
    "json_link_no_total": ("json_link", JSONLinkPaginator, {}, None),
}
RANDOM: dict[str, Case] = {
    "total_records_path": (
        "page_number",
        lambda: PageNumberPaginator(page_size=10, total_records_path="total"),
        {},
        25,
    ),
    "total_pages_path_and_body_total": (
        "page_number",
        lambda: PageNumberPaginator(total_pages_path="total_pages"),
        {"total_path": "total"},
        25,
    ),
    "total_pages_path_only": (
        "page_number",
        lambda: PageNumberPaginator(total_pages_path="total_pages"),
        {},
        None,
    ),
    "offset_total_path": ("offset", lambda: OffsetPaginator(limit=10, total_path="total"), {}, 25),
    "offset_total_header": (
        "offset",
        lambda: OffsetPaginator(limit=10, total_header="X-Total-Count"),
        {},
        25,
    ),
    "offset_total_from_5": (
        "offset",
        lambda: OffsetPaginator(limit=10, offset=5, total_path="total"),
        {},
        20,
    ),
    "max_pages_above_the_count": (
        "offset",
        lambda: OffsetPaginator(limit=10, total_path="total", max_pages=3),
        {},
        25,
    ),
}


@pytest.mark.parametrize("case", sorted(SEQUENTIAL))
def test_pages_read_in_order_carry_the_reported_total(case: str) -> None:
    style, paginator, options, expected = SEQUENTIAL[case]
    with serve_records(RECORDS[:25], 10, style=style) as api:
        src = HttpJsonSource(api.url, paginator=paginator(), records_path="items", **options)
        pages = list(src.pages(None))
    assert pages and {p.reported_total for p in pages} == {expected}
    assert sum(len(p.records) for p in pages) == 25 - (5 if case == "offset_from_5" else 0)


@pytest.mark.parametrize("case", sorted(RANDOM))
def test_planned_refs_carry_the_planning_requests_total(case: str) -> None:
    style, paginator, options, expected = RANDOM[case]
    with serve_records(RECORDS[:25], 10, style=style) as api:
        src = HttpJsonSource(api.url, paginator=paginator(), records_path="items", **options)
        refs = src.plan(None)
        assert refs and api.count_requests() == 1
        assert {ref.reported_total for ref in refs} == {expected}
        pages = [src.fetch(ref) for ref in refs]
    assert {p.reported_total for p in pages} == {expected}
    assert sum(len(p.records) for p in pages) == (expected or 25)


def test_max_pages_reads_less_on_purpose_and_reports_no_total() -> None:
    with serve_records(RECORDS[:25], 10, style="offset") as api:
        capped = OffsetPaginator(limit=10, total_path="total", max_pages=2)
        src = HttpJsonSource(api.url, paginator=capped, records_path="items")
        refs = src.plan(None) or []
        assert len(refs) == 2 and {ref.reported_total for ref in refs} == {None}
        walk = HttpJsonSource(
            api.url, paginator=OffsetPaginator(limit=10, max_pages=2), records_path="items"
        )
        assert [p.reported_total for p in walk.pages(None)] == [None, None]


def test_total_options_are_checked_at_definition() -> None:
    for bad in ({"total_header": ""}, {"total_path": "a..b"}, {"total_header": 3}):
        with pytest.raises(FlowDefinitionError):
            HttpJsonSource("http://api.test/x", paginator=HeaderLinkPaginator(), **bad)
