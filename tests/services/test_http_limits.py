"""A hostile or broken API cannot exhaust a step: body size, time per request, records per
page, pages per walk or plan, JSON nesting, all bounded, each failure naming the limit, the
value seen and the option. Real HTTP server on 127.0.0.1 (tests/httpfixture.py) sending
huge, slow, endless or deeply nested answers. Nothing faked."""

from __future__ import annotations

import json
import time
from itertools import islice
from typing import Any

import pytest

from flow_assets.errors import FlowDefinitionError, SourceError
from flow_assets.sources import (
    BasePaginator,
    BearerAuth,
    HeaderAuth,
    HttpJsonSource,
    JSONCursorPaginator,
    JSONLinkPaginator,
    OffsetPaginator,
    PageNumberPaginator,
    SourceDownError,
)
from tests.httpfixture import serve_records

pytestmark = pytest.mark.services

RECORDS = [{"id": i} for i in range(25)]
TOKEN = "tok-3e1f-very-secret"


def source(url: str, paginator: BasePaginator, **kwargs: Any) -> HttpJsonSource:
    options: dict[str, Any] = {"records_path": "items", "max_retries": 0, "name": "orders"}
    return HttpJsonSource(url, paginator=paginator, **{**options, **kwargs})


def read_all(src: HttpJsonSource) -> list[Any]:
    return [record for page in src.pages(None) for record in page.records]


def big_page(size: int) -> str:
    return json.dumps({"items": [{"id": 0, "pad": "x" * size}]})


# -- body size -----------------------------------------------------------------------------


def test_a_body_over_max_body_bytes_fails_on_its_content_length() -> None:
    with serve_records(RECORDS, 10) as api:
        api.inject(body=big_page(2_000_000), content_type="application/json")
        src = source(api.url, PageNumberPaginator(), max_body_bytes=1_000_000)
        with pytest.raises(SourceError) as caught:
            read_all(src)
    message = str(caught.value)
    assert "Source 'orders', page 0" in message
    assert "(Content-Length), over max_body_bytes=1000000" in message
    assert "or raise max_body_bytes=" in message


def test_a_body_without_length_is_cut_at_max_body_bytes() -> None:
    with serve_records(RECORDS, 10) as api:
        api.inject(body=big_page(5_000_000), content_type="application/json", content_length=False)
        src = source(api.url, PageNumberPaginator(), max_body_bytes=100_000)
        with pytest.raises(SourceError, match=r"passed max_body_bytes=100000 \(\d+ bytes read"):
            read_all(src)


def test_the_default_max_body_bytes_bounds_the_memory_of_a_page() -> None:
    # Parsed JSON takes up to ~30 times its text: 63 MiB of [{},{},...] peaked at 1.9 GB
    # under the old 64 MiB default. 16 MiB bounds a page to ~0.5 GB (docs/http-sources.md).
    with serve_records(RECORDS, 10, records_key=None) as api:
        api.inject(body="[" + " " * 16 * 2**20 + "]", content_type="application/json")
        with pytest.raises(SourceError, match=r"over max_body_bytes=16777216"):
            read_all(source(api.url, PageNumberPaginator(), records_path=None))


def test_an_error_body_of_any_size_gives_a_short_excerpt() -> None:
    with serve_records(RECORDS, 10) as api:
        api.inject(status=404, body="no such page " + "x" * 5_000_000, content_length=False)
        started = time.monotonic()
        with pytest.raises(SourceError, match=r"HTTP 404 \(not retried\); body: 'no such page x"):
            read_all(source(api.url, PageNumberPaginator(), max_body_bytes=1000))
        assert time.monotonic() - started < 5  # read and masked in linear time, in part


# -- time per request ----------------------------------------------------------------------


def test_a_dripping_body_is_cut_at_request_deadline() -> None:
    # 4 bytes every 50 ms: no read ever waits the 2 s read timeout, yet the body would take
    # ~25 s. The old client read on until the end, far past its timeout.
    with serve_records(RECORDS, 10) as api:
        api.inject(body=big_page(2000), content_type="application/json", drip=(4, 0.05))
        src = source(api.url, PageNumberPaginator(), timeout=(1, 2), request_deadline=1)
        started = time.monotonic()
        with pytest.raises(SourceError) as caught:
            read_all(src)
        elapsed = time.monotonic() - started
        assert api.count_requests() == 1  # an overrun is final: not retried by the source
    message = str(caught.value)
    assert "timed out: the request took longer than request_deadline=1 s" in message
    assert "bytes of the body read" in message and "Fix: raise request_deadline=" in message
    assert not isinstance(caught.value, SourceDownError)  # a slow page, not a dead source
    assert elapsed < 1.9


@pytest.mark.parametrize("content_length", [True, False])
def test_a_retried_answer_with_a_large_body_is_not_read(content_length: bool) -> None:
    # urllib3 reads all of an answer it retries: a 503 dripping 20 kB held the old client
    # ~16 s (and a huge one would fill the memory). It is closed unread; the retry succeeds.
    # (The answer that spends the last retry is read as any error: its start only.)
    with serve_records(RECORDS, 10) as api:
        body = "busy " * 4000
        api.inject(status=503, body=body, drip=(64, 0.05), content_length=content_length)
        src = source(api.url, PageNumberPaginator(), max_retries=1, backoff_factor=0)
        started = time.monotonic()
        assert read_all(src) == RECORDS
        assert time.monotonic() - started < 5
        assert [r.status for r in api.requests][:2] == [503, 200]


@pytest.mark.parametrize("tls", [False, True])
def test_a_dripping_head_is_cut_at_request_deadline(
    tls: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Status line and headers one byte every 0.1 s: http.client reads them all before any
    # check of ours, each read within the read timeout. The old client waited ~8 s.
    with serve_records(RECORDS, 10, tls=tls) as api:
        if api.ca_file:
            monkeypatch.setenv("REQUESTS_CA_BUNDLE", api.ca_file)
        api.inject(drip_head=0.1)
        src = source(api.url, PageNumberPaginator(), timeout=(1, 2), request_deadline=1)
        started = time.monotonic()
        with pytest.raises(SourceError) as caught:
            read_all(src)
        elapsed = time.monotonic() - started
    message = str(caught.value)
    assert "timed out: the request took longer than request_deadline=1 s" in message
    assert not isinstance(caught.value, SourceDownError)
    assert elapsed < 1.9


def test_retry_after_waits_stop_at_request_deadline() -> None:
    # Three 503s asking to wait 2 s each held a request_deadline=1 request 6 s.
    with serve_records(RECORDS, 10) as api:
        api.inject(status=503, retry_after="2", times=None)
        src = source(api.url, PageNumberPaginator(), request_deadline=1, max_retries=3)
        started = time.monotonic()
        with pytest.raises(SourceError) as caught:
            read_all(src)
        assert time.monotonic() - started < 1
        assert api.count_requests() == 1
    message = str(caught.value)
    assert "the next retry would wait 2 s, past request_deadline=1 s" in message
    assert "Fix: raise request_deadline= (the retries' waits count)" in message


def test_backoff_retries_stop_at_request_deadline() -> None:
    # Waits 0, 0.6, 1.2, 2.4... (plus jitter): the old client went on for ~40 s.
    with serve_records(RECORDS, 10) as api:
        api.inject(status=500, times=None)
        src = source(
            api.url, PageNumberPaginator(), request_deadline=1, max_retries=6, backoff_factor=0.3
        )
        started = time.monotonic()
        with pytest.raises(SourceError, match="past request_deadline=1 s"):
            read_all(src)
        assert time.monotonic() - started < 1.5
        assert 2 <= api.count_requests() <= 3


@pytest.mark.parametrize("deadline", [0.5, float("inf")])
def test_a_quick_answer_is_well_within_the_deadline(deadline: float) -> None:
    with serve_records(RECORDS, 10) as api:
        src = source(api.url, PageNumberPaginator(), request_deadline=deadline)
        assert read_all(src) == RECORDS


# -- records per page ----------------------------------------------------------------------


def test_a_page_over_max_page_records_fails() -> None:
    with serve_records(RECORDS, 25) as api, pytest.raises(SourceError) as caught:
        read_all(source(api.url, PageNumberPaginator(), max_page_records=10))
    message = str(caught.value)
    assert "page 0" in message and "the page holds 25 records, over max_page_records=10" in message
    assert "or raise max_page_records=" in message


# -- pages per walk or plan ----------------------------------------------------------------


def test_an_endless_cursor_cycle_fails_instead_of_looping() -> None:
    # c10 -> c20 -> c10 -> ...: each cursor differs from the one before it, so the old
    # check (the same cursor twice in a row) never fired and the walk went on forever.
    with serve_records(RECORDS, 10, style="cursor") as api:
        back = json.dumps({"items": RECORDS[20:], "next_cursor": "c10"})
        api.inject(query={"cursor": "c20"}, body=back, content_type="application/json", times=None)
        pages = source(api.url, JSONCursorPaginator()).pages(None)
        with pytest.raises(SourceError, match=r"page 2 .*a cursor met before \(after 3 pages\)"):
            list(islice(pages, 50))  # bounded, should the cycle go unnoticed
        assert api.count_requests() == 3


def test_an_endless_next_link_cycle_fails_instead_of_looping() -> None:
    with serve_records(RECORDS, 10, style="json_link") as api:
        back = json.dumps({"items": RECORDS[20:], "next": "/?page=1"})
        api.inject(query={"page": "2"}, body=back, content_type="application/json", times=None)
        pages = source(api + "/", JSONLinkPaginator()).pages(None)
        with pytest.raises(SourceError, match=r"page 2 .*points at a page read before"):
            list(islice(pages, 50))


def test_a_walk_that_never_ends_fails_at_page_limit() -> None:
    # Every cursor new: only the page limit stops it (it fails: max_pages cuts on purpose).
    with serve_records([{"id": i} for i in range(1000)], 1, style="cursor") as api:
        src = source(api.url, JSONCursorPaginator(), page_limit=5)
        with pytest.raises(SourceError) as caught:
            read_all(src)
        assert api.count_requests() == 5
    message = str(caught.value)
    assert "page 4" in message and "5 pages read and the API still names a next one" in message
    assert "page_limit=5" in message and "Fix: raise page_limit=" in message
    assert "max_pages" in message


@pytest.mark.parametrize(
    ("paginator", "body", "headers", "pages"),
    [
        (
            PageNumberPaginator(total_pages_path="total_pages"),
            {"items": RECORDS[:10], "total_pages": 10**9},
            {},
            10**9,
        ),
        (
            OffsetPaginator(limit=10, total_header="X-Total-Count"),
            {"items": RECORDS[:10]},
            {"X-Total-Count": str(10**15)},
            10**14,
        ),
    ],
)
def test_a_huge_planned_page_count_is_refused_before_any_fan_out(
    paginator: BasePaginator, body: dict[str, Any], headers: dict[str, str], pages: int
) -> None:
    # The old plan listed every page: a MemoryError (or the machine's memory) for 10**9.
    with serve_records(RECORDS, 10) as api:
        api.inject(body=json.dumps(body), content_type="application/json", headers=headers)
        started = time.monotonic()
        with pytest.raises(SourceError) as caught:
            source(api.url, paginator).plan(None)  # the defaults: page_limit=100000
        assert time.monotonic() - started < 5
    message = str(caught.value)
    assert f"the API reports {pages} pages, over page_limit=100000" in message
    assert "Fix: raise page_limit=" in message


def test_a_plan_within_page_limit_is_lazy_and_complete() -> None:
    with serve_records(RECORDS, 10) as api:
        src = source(api.url, PageNumberPaginator(total_pages_path="total_pages"), page_limit=3)
        refs = src.plan(None)
        assert refs is not None and len(refs) == 3 and refs[2].params == {"page": 2}
        assert [r for ref in refs for r in src.fetch(ref).records] == RECORDS


def test_max_pages_over_page_limit_is_refused_at_definition() -> None:
    with pytest.raises(FlowDefinitionError, match=r"max_pages \(10\) is over page_limit \(5\)"):
        source("http://api.test/x", PageNumberPaginator(max_pages=10), page_limit=5)


# -- JSON nesting --------------------------------------------------------------------------


@pytest.mark.parametrize("records_path", [None, "items"])
def test_json_nested_too_deep_is_a_source_error(records_path: str | None) -> None:
    # The old source let json's RecursionError out: no source, no page, no fix.
    deep = "[" * 100_000 + "]" * 100_000
    deep = deep if records_path is None else f'{{"items": {deep}}}'
    with serve_records(RECORDS, 10, records_key=records_path) as api:
        api.inject(nth=2, body=deep, content_type="application/json")
        src = source(api.url, PageNumberPaginator(), records_path=records_path)
        with pytest.raises(SourceError) as caught:
            read_all(src)
    message = str(caught.value)
    assert "Source 'orders', page" in message and "nests deeper than the parser follows" in message
    assert "Fix: fix the API, or ask it for flatter records" in message


# -- what errors show ------------------------------------------------------------------------


def test_an_error_excerpt_masks_the_credentials_an_api_echoes() -> None:
    # Some APIs echo the request in their errors: the excerpt must not carry it into logs.
    echo = (
        f"denied: Authorization: Bearer {TOKEN}; X-API-Key: k3y-000-secret; "
        f'{{"api_key": "k3y-111-secret", "client_secret": "c5-222"}} tenant=tn-333-secret'
    )
    with serve_records(RECORDS, 10) as api:
        api.inject(status=403, body=echo)
        src = source(
            api.url,
            PageNumberPaginator(),
            auth=BearerAuth(TOKEN),
            headers={"X-Tenant-Key": "tn-333-secret"},
        )
        with pytest.raises(SourceError) as caught:
            read_all(src)
    message = str(caught.value)
    for secret in (TOKEN, "k3y-000-secret", "k3y-111-secret", "c5-222", "tn-333-secret"):
        assert secret not in message, message
    assert "Authorization: Bearer ***" in message and "X-API-Key: ***" in message


def test_an_echoed_header_auth_value_is_masked_by_value() -> None:
    with serve_records(RECORDS, 10) as api:
        api.inject(status=401, body=f"unknown key abc {TOKEN} for this endpoint")
        src = source(api.url, PageNumberPaginator(), auth=HeaderAuth("X-Key", TOKEN))
        with pytest.raises(SourceError, match=r"unknown key abc \*\*\* for this") as caught:
            read_all(src)
    assert TOKEN not in str(caught.value)


def test_errors_name_only_field_like_keys_of_the_body() -> None:
    # Keys can be data: an API keyed by e-mail addresses must not put them in errors.
    body = json.dumps({"alice@example.com": {"n": 1}, "bob@example.com": {}, "data": []})
    with serve_records(RECORDS, 10) as api:
        api.inject(body=body, content_type="application/json")
        with pytest.raises(SourceError) as caught:
            read_all(source(api.url, PageNumberPaginator(), records_path="rows"))
    message = str(caught.value)
    assert "example.com" not in message
    assert "a JSON object (keys: data; 2 more not shown)" in message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_body_bytes": 0}, "max_body_bytes must be an integer >= 1"),
        ({"max_page_records": True}, "max_page_records must be an integer >= 1"),
        ({"page_limit": 0}, "page_limit must be an integer >= 1"),
        ({"request_deadline": 0}, "request_deadline must be seconds > 0"),
        ({"request_deadline": "5"}, "request_deadline must be seconds > 0"),
    ],
)
def test_limits_are_checked_at_definition(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(FlowDefinitionError, match=message):
        source("http://api.test/x", PageNumberPaginator(), **kwargs)
