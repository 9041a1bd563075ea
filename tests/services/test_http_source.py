"""HttpJsonSource (flow_assets/sources/http.py) against a real HTTP server on 127.0.0.1
(tests/httpfixture.py), with real requests/urllib3 retries; failures are injected by the
server, nothing in the client is faked."""

from __future__ import annotations

import pickle
import socket
from collections.abc import Callable
from typing import Any

import pytest

from flow_assets.errors import FlowDefinitionError, SourceError
from flow_assets.sources import (
    BasePaginator,
    BearerAuth,
    HeaderLinkPaginator,
    HttpJsonSource,
    JSONCursorPaginator,
    JSONLinkPaginator,
    OffsetPaginator,
    PageNumberPaginator,
    Source,
)
from tests.httpfixture import serve_records

pytestmark = pytest.mark.services

# Duplicated ids on purpose: a source returns what the API holds, duplicates included.
RECORDS = [{"id": i % 20, "n": i} for i in range(25)]
FAST = {"backoff_factor": 0.01, "max_retries": 2}


def source(url: str, paginator: BasePaginator, **kwargs: Any) -> HttpJsonSource:
    options: dict[str, Any] = {"records_path": "items", **FAST, **kwargs}
    return HttpJsonSource(url, paginator=paginator, **options)


def all_records(src: HttpJsonSource, partition_key: str | None = None) -> list[Any]:
    return [r for page in src.pages(partition_key) for r in page.records]


SEQUENTIAL: dict[str, tuple[str, Callable[[], BasePaginator]]] = {
    "page_number": ("page_number", lambda: PageNumberPaginator()),
    "offset": ("offset", lambda: OffsetPaginator(limit=10)),
    "cursor": ("cursor", lambda: JSONCursorPaginator()),
    "json_link": ("json_link", lambda: JSONLinkPaginator()),
    "link_header": ("link_header", lambda: HeaderLinkPaginator()),
}
RANDOM: dict[str, tuple[str, Callable[[], BasePaginator]]] = {
    "total_pages": ("page_number", lambda: PageNumberPaginator(total_pages_path="total_pages")),
    "total_records": (
        "page_number",
        lambda: PageNumberPaginator(page_size=10, total_records_path="total"),
    ),
    "offset_total_path": ("offset", lambda: OffsetPaginator(limit=10, total_path="total")),
    "offset_header": (
        "offset",
        lambda: OffsetPaginator(limit=10, total_header="X-Total-Count"),
    ),
}


@pytest.mark.parametrize("case", sorted(SEQUENTIAL))
def test_each_pagination_style_reads_every_record_in_order(case: str) -> None:
    style, paginator = SEQUENTIAL[case]
    with serve_records(RECORDS, 10, style=style) as api:
        src = source(api + "/orders", paginator())
        pages = list(src.pages(None))
        assert src.plan(None) is None
        assert [p.index for p in pages] == [0, 1, 2]
        assert [r for p in pages for r in p.records] == RECORDS
        assert all(p.label.startswith(f"GET {api}/orders") for p in pages)
        assert pages == list(src.pages(None))  # deterministic


@pytest.mark.parametrize("case", sorted(RANDOM))
def test_random_access_plans_every_page_from_one_request(case: str) -> None:
    style, paginator = RANDOM[case]
    with serve_records(RECORDS, 10, style=style) as api:
        src = source(api.url, paginator(), params={"region": "eu"})
        refs = src.plan(None)
        assert refs is not None and api.count_requests() == 1
        assert [ref.index for ref in refs] == [0, 1, 2]
        assert all(ref.params["region"] == "eu" for ref in refs)
        # Pages fetched out of order are the same pages the sequential walk reads.
        fetched = {ref.index: src.fetch(ref) for ref in reversed(refs)}
        assert [fetched[i] for i in range(3)] == list(src.pages(None))
        assert [r for i in range(3) for r in fetched[i].records] == RECORDS


def test_one_based_pages() -> None:
    with serve_records(RECORDS, 10, base_page=1) as api:
        src = source(api.url, PageNumberPaginator(base_page=1, total_pages_path="total_pages"))
        refs = src.plan(None) or []
        assert [ref.params["page"] for ref in refs] == [1, 2, 3]
        assert all_records(src) == RECORDS


def test_empty_last_page_ends_the_walk_and_is_not_a_page() -> None:
    with serve_records(RECORDS[:20], 10, include_total=False) as api:
        pages = list(source(api.url, PageNumberPaginator()).pages(None))
        assert [len(p.records) for p in pages] == [10, 10]
        assert api.count_requests() == 3  # the third, empty, page said "no more"


def test_empty_source_has_no_pages() -> None:
    with serve_records([], 10) as api:
        assert list(source(api.url, PageNumberPaginator()).pages(None)) == []
        refs = source(api.url, PageNumberPaginator(total_pages_path="total_pages")).plan(None)
        assert refs is not None and list(refs) == []


@pytest.mark.parametrize("links", ["path", "query", "absolute"])
@pytest.mark.parametrize("style", ["json_link", "link_header"])
def test_next_links_relative_or_absolute(style: str, links: str) -> None:
    paginator = JSONLinkPaginator() if style == "json_link" else HeaderLinkPaginator()
    with serve_records(RECORDS, 10, style=style, links=links) as api:
        assert all_records(source(api + "/v1/orders", paginator)) == RECORDS
        assert {r.path for r in api.requests} == {"/v1/orders"}


def test_partition_key_is_sent_as_a_query_param() -> None:
    def per_day(query: dict[str, str]) -> list[dict[str, str]]:
        return [{"day": query.get("date", "none"), "i": str(i)} for i in range(3)]

    with serve_records(per_day, 2, style="cursor") as api:
        src = source(api.url, JSONCursorPaginator(), partition_param="date")
        assert {r["day"] for r in all_records(src, "2024-01-02")} == {"2024-01-02"}
        assert {r.query["date"] for r in api.requests} == {"2024-01-02"}


def test_429_with_retry_after_then_success() -> None:
    with serve_records(RECORDS, 10) as api:
        api.inject(status=429, nth=1, retry_after="1")
        assert all_records(source(api.url, PageNumberPaginator())) == RECORDS
        statuses = [r.status for r in api.requests]
        assert statuses[:2] == [429, 200] and api.requests[0].query == api.requests[1].query


def test_500_then_success() -> None:
    with serve_records(RECORDS, 10) as api:
        api.inject(status=500, query={"page": "1"})
        assert all_records(source(api.url, PageNumberPaginator())) == RECORDS
        assert api.count_requests(page="1") == 2


def test_5xx_that_never_recovers_fails_after_the_retries() -> None:
    with serve_records(RECORDS, 10) as api:
        api.inject(status=503, times=None, body='{"error": "maintenance"}')
        src = source(api.url, PageNumberPaginator(), name="orders")
        with pytest.raises(SourceError) as caught:
            list(src.pages(None))
        message = str(caught.value)
        assert "Source 'orders', page 0" in message
        assert "HTTP 503 still, after 2 retries" in message and "maintenance" in message
        assert api.count_requests() == 3


def test_404_is_not_retried_and_says_what_failed() -> None:
    with serve_records(RECORDS, 10) as api:
        api.inject(status=404, body="no such endpoint " + "x" * 500, query={"page": "1"})
        src = source(api + "/ordres", PageNumberPaginator())
        with pytest.raises(SourceError) as caught:
            list(src.pages(None))
        message = str(caught.value)
        assert f"page 1 (GET {api}/ordres?page=1)" in message
        assert "HTTP 404 (not retried)" in message and "no such endpoint" in message
        assert "x" * 201 not in message  # the body excerpt is short
        assert "Fix: check the URL" in message
        assert api.count_requests(page="1") == 1


def test_credentials_never_show_in_errors_or_str() -> None:
    with serve_records(RECORDS, 10) as api:
        api.inject(status=401, times=None)
        src = source(
            api.url.replace("http://", "http://robot:pa55word@"),
            PageNumberPaginator(),
            params={"access_token": "t0ken"},
            auth=BearerAuth("s3cret"),
        )
        with pytest.raises(SourceError) as caught:
            list(src.pages(None))
        shown = f"{caught.value} {src} {src.auth!r}"
        for secret in ("pa55word", "t0ken", "s3cret"):
            assert secret not in shown
        assert "robot:***@" in shown and "access_token=***" in shown
        assert "Fix: check the credentials" in shown
        assert api.requests[0].headers["Authorization"] == "Bearer s3cret"


def test_non_json_body_names_source_page_and_problem() -> None:
    with serve_records(RECORDS, 10) as api:
        api.inject(nth=2, body="<html>gateway</html>", content_type="text/html")
        src = source(api.url, PageNumberPaginator(), name="orders")
        with pytest.raises(
            SourceError, match=r"'orders', page 1 .*not JSON \(text/html\).*gateway"
        ):
            list(src.pages(None))


def test_missing_records_path_lists_the_keys() -> None:
    with serve_records(RECORDS, 10) as api:
        src = source(api.url, PageNumberPaginator(), records_path="data.rows")
        with pytest.raises(SourceError, match=r"page 0 .*'data.rows' is not in the body.*items"):
            list(src.pages(None))


def test_records_path_that_is_not_a_list() -> None:
    with serve_records(RECORDS, 10) as api:
        src = source(api.url, PageNumberPaginator(), records_path="total")
        with pytest.raises(SourceError, match="'total' holds a JSON int, not a list"):
            list(src.pages(None))


def test_body_list_without_records_path() -> None:
    with serve_records(RECORDS, 10, style="link_header", records_key=None) as api:
        assert all_records(source(api.url, HeaderLinkPaginator(), records_path=None)) == RECORDS
        src = source(api.url, HeaderLinkPaginator(), records_path="items")
        with pytest.raises(SourceError, match="a JSON list"):
            list(src.pages(None))
    with (
        serve_records(RECORDS, 10) as api,
        pytest.raises(SourceError, match=r"not a list of records.*set records_path"),
    ):
        list(source(api.url, PageNumberPaginator(), records_path=None).pages(None))


def test_missing_total_fails_the_plan_clearly() -> None:
    with serve_records(RECORDS, 10, include_total=False) as api:
        src = source(api.url, PageNumberPaginator(total_pages_path="total_pages"))
        with pytest.raises(SourceError, match=r"page 0 .*'total_pages' is not in the response"):
            src.plan(None)


def test_read_timeout_is_a_source_error() -> None:
    with serve_records(RECORDS, 10) as api:
        api.inject(delay=1.0)
        src = source(api.url, PageNumberPaginator(), timeout=(1, 0.2), max_retries=0)
        with pytest.raises(SourceError, match=r"timed out \(timeout=\(1, 0.2\) s\), after 0"):
            list(src.pages(None))


def test_connection_refused_is_a_source_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    src = source(f"http://127.0.0.1:{port}/x", PageNumberPaginator(), max_retries=1)
    with pytest.raises(
        SourceError, match=r"request failed: .*refused, after 1 retries.*server is up"
    ):
        list(src.pages(None))


def test_source_survives_pickling_and_is_a_source() -> None:
    with serve_records(RECORDS, 10) as api:
        src = source(api.url, PageNumberPaginator(total_pages_path="total_pages"))
        refs = src.plan(None) or []
        copy = pickle.loads(pickle.dumps(src))
        assert isinstance(copy, Source)
        assert copy.fetch(refs[2]).records == RECORDS[20:]
        assert str(copy) == (
            f"HttpJsonSource(GET {api}, "
            "PageNumberPaginator(page_param='page', base_page=0, total_pages_path='total_pages'))"
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "ftp://host/x"}, "url must be an http"),
        ({"url": "http://u:pw@/x"}, r"u:\*\*\*@"),
        ({"paginator": "page"}, "paginator must be"),
        ({"records_path": "a..b"}, "records_path must be a dotted JSON path"),
        ({"timeout": 0}, "timeout must be"),
        ({"timeout": (1, 2, 3)}, "timeout must be"),
        ({"max_retries": -1}, "max_retries must be an integer >= 0"),
        ({"backoff_factor": -1}, "backoff_factor must be >= 0"),
        ({"partition_param": ""}, "partition_param must be a non-empty string"),
    ],
)
def test_invalid_arguments_are_refused(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"url": "http://api.test/x", "paginator": PageNumberPaginator()}
    with pytest.raises(FlowDefinitionError, match=message):
        HttpJsonSource(**{**arguments, **kwargs})
