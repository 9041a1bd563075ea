"""What the errors of HttpJsonSource show, against a real HTTP server on 127.0.0.1
(tests/httpfixture.py): no record data (personal data masked, values described or cut), no
secret, no chained exception; and malformed links or totals fail as SourceErrors naming the
page, the problem and the fix, never as bare ValueError, OverflowError or InvalidURL."""

from __future__ import annotations

import json
import re
import socket
import traceback
from typing import Any

import pytest

from flow_assets.errors import SourceError
from flow_assets.sources import (
    BasePaginator,
    BearerAuth,
    HttpJsonSource,
    JSONCursorPaginator,
    JSONLinkPaginator,
    OffsetPaginator,
    PageNumberPaginator,
)
from tests.httpfixture import serve_records

pytestmark = pytest.mark.services

RECORDS = [{"id": i} for i in range(25)]

EMAIL, SSN = "alice.liddell@example.com", "123-45-6789"
SECRET = "S3CRET-client-xyz123"


def source(url: str, paginator: BasePaginator, **kwargs: Any) -> HttpJsonSource:
    options: dict[str, Any] = {"records_path": "items", "max_retries": 0, **kwargs}
    return HttpJsonSource(url, paginator=paginator, **options)


def error_of(src: HttpJsonSource, plan: bool = False) -> SourceError:
    with pytest.raises(SourceError) as caught:
        src.plan(None) if plan else [r for page in src.pages(None) for r in page.records]
    return caught.value


@pytest.mark.parametrize("case", ["csv_body", "error_body"])
def test_body_excerpts_mask_personal_data(case: str) -> None:
    # An export endpoint answering CSV, an API quoting the customer in a 404: the old
    # errors carried the e-mail and the SSN into logs and Dagster events.
    with serve_records(RECORDS, 10) as api:
        if case == "csv_body":
            api.inject(body=f"id,email,ssn\n1,{EMAIL},{SSN}\n", content_type="text/csv")
        else:
            api.inject(status=404, body=json.dumps({"error": f"customer {EMAIL} (ssn {SSN})"}))
        message = str(error_of(source(api.url, PageNumberPaginator())))
    assert EMAIL not in message and SSN not in message
    assert "<email>" in message and "<number>" in message


@pytest.mark.parametrize("where", ["total_pages_path", "total_header"])
def test_a_total_holding_record_data_is_described_not_quoted(where: str) -> None:
    # A total holding an object gave a 5,285-character error with the e-mail and the SSN.
    record = {"owner": EMAIL, "ssn": SSN, "blob": "x" * 5000}
    with serve_records(RECORDS, 10) as api:
        if where == "total_pages_path":
            api.inject(body=json.dumps({"items": [], "total_pages": record}))
            paginator = PageNumberPaginator(total_pages_path="total_pages")
            src = source(api.url, paginator)
        else:
            api.inject(headers={"X-Count": f"{EMAIL} {SSN} " + "y" * 5000})
            src = source(api.url, PageNumberPaginator(), total_header="X-Count")
        message = str(error_of(src, plan=where == "total_pages_path"))
    assert EMAIL not in message and SSN not in message and len(message) < 700
    shown = {"total_pages_path": "a JSON object (keys: blob, owner, ssn)", "total_header": "'<"}
    assert f"holds {shown[where]}" in message


def test_only_secret_named_headers_are_masked_by_value() -> None:
    # Every header value was masked: an excerpt lost "application/json" to "***".
    with serve_records(RECORDS, 10) as api:
        api.inject(status=415, body="expected application/json; tenant tn-333-secret unknown")
        headers = {"Accept": "application/json", "X-Tenant-Key": "tn-333-secret"}
        src = source(api.url, PageNumberPaginator(), headers=headers)
        message = str(error_of(src))
    assert "expected application/json; tenant *** unknown" in message


@pytest.mark.parametrize(
    ("link", "problem"),
    [
        ("http://[::1", "page 0 .*the next link is not a valid URL"),
        ("http://127.0.0.1:99999/x", "page 1 .*the next link cannot be requested"),
        ("http://user:pw@", "page 1 .*the next link cannot be requested"),
        ("mailto:someone@example.com", "page 1 .*the next link is not an http"),
        ("http://\u2100.example/", "page 0 .*the next link is not a valid URL"),
    ],
)
def test_a_malformed_next_link_is_a_source_error(link: str, problem: str) -> None:
    # The old source let ValueError and requests' InvalidURL out: no page, no fix.
    with serve_records(RECORDS, 10, style="json_link") as api:
        api.inject(body=json.dumps({"items": RECORDS[:10], "next": link}))
        src = source(api.url, JSONLinkPaginator(), auth=BearerAuth(SECRET))
        message = str(error_of(src))
    assert re.search(problem, message) and "Fix: " in message, message
    assert SECRET not in message and ":pw@" not in message


@pytest.mark.parametrize("total", ["Infinity", "1e400", "1" + "0" * 400, '"\u00b2"'])
@pytest.mark.parametrize("reader", ["offset", "page_number", "total_path"])
def test_a_total_out_of_range_is_a_source_error(total: str, reader: str) -> None:
    # Infinity and 1e400 (a float infinity) and 10**400 raised a bare OverflowError.
    paginators = {
        "offset": OffsetPaginator(limit=10, total_path="total"),
        "page_number": PageNumberPaginator(total_records_path="total", page_size=10),
        "total_path": JSONCursorPaginator(),
    }
    with serve_records(RECORDS, 10) as api:
        api.inject(body=f'{{"items": [{{"id": 1}}], "total": {total}}}', times=None)
        src = source(api.url, paginators[reader], total_path="total", total_header=None)
        message = str(error_of(src, plan=reader != "total_path"))
    assert "'total' holds" in message and "not a non-negative integer" in message


def test_a_total_header_of_odd_digits_is_ignored_or_refused() -> None:
    # "²" is a digit to str.isdigit, not to int(): the old source let ValueError out.
    with serve_records(RECORDS, 10) as api:
        api.inject(headers={"X-Total-Count": "²", "X-Count": "²"}, times=None)
        pages = list(source(api.url, PageNumberPaginator()).pages(None))
        assert [p.reported_total for p in pages] == [None] * 3
        src = source(api.url, PageNumberPaginator(), total_header="X-Count")
        assert "total header 'X-Count' holds '²'" in str(error_of(src))


@pytest.mark.parametrize("case", ["refused", "paginator"])
def test_errors_chain_no_exception_that_could_leak(case: str) -> None:
    # Dagster stores __cause__ in the event log: requests' ConnectionError quotes the URL
    # with its query secrets ("Max retries exceeded with url: /x?client_secret=...").
    params = {"client_secret": SECRET}
    if case == "refused":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        error = error_of(source(f"http://127.0.0.1:{port}/x", PageNumberPaginator(), params=params))
    else:
        with serve_records(RECORDS, 10) as api:
            api.inject(body=json.dumps({"items": [], "total_pages": -1}))
            paginator = PageNumberPaginator(total_pages_path="total_pages")
            error = error_of(source(api.url, paginator, params=params), plan=True)
    assert error.__cause__ is None and error.__suppress_context__
    assert SECRET not in "".join(traceback.format_exception(error))
