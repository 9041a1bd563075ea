"""Limits that keep a hostile or broken HTTP API from exhausting a step.

Every one has a default and an option of :class:`~flow_assets.sources.HttpJsonSource`;
a request that passes one fails with the limit, the value seen and the option to raise:

* ``max_body_bytes``: the size of a response body (``Content-Length`` is checked before
  reading; the body is read in chunks and the read stops once over);
* ``request_deadline``: the wall-clock time of one request, from sending it to the last
  byte of its body, retries and redirects included (timeouts bound each socket wait only:
  a server sending a few bytes a second never trips them);
* ``max_page_records``: the records on one page;
* ``page_limit``: the pages of one walk or plan. A safety limit: passing it fails the read,
  where a paginator's ``max_pages`` stops it early on purpose.
"""

from __future__ import annotations

import time
from typing import Any

import requests

from flow_assets.errors import FlowDefinitionError
from flow_assets.options import is_seconds

MIB = 1024 * 1024
DEFAULT_MAX_BODY_BYTES = 64 * MIB
DEFAULT_MAX_PAGE_RECORDS = 100_000
DEFAULT_REQUEST_DEADLINE = 300.0
DEFAULT_PAGE_LIMIT = 100_000
# Of an error answer only an excerpt is shown: read no more than this of its body.
ERROR_BODY_BYTES = 64 * 1024
# At most one socket read per chunk (read1), so the deadline is checked as bytes come.
_CHUNK = 64 * 1024
_SMALLER_PAGES = "ask the API for smaller pages (its page size parameter)"


class HttpProblem(Exception):
    """What went wrong with a request and how to fix it; the source adds its name, the
    page and the URL to make a SourceError of it."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


class Deadline:
    """The wall clock of one request: ``seconds`` from its start."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def check(self, progress: str) -> None:
        """HttpProblem if the time is up; ``progress`` says how far the request got."""
        if time.monotonic() > self._end:
            raise HttpProblem(
                f"timed out: the request took longer than request_deadline={self.seconds:g} s"
                f" ({progress}); not retried",
                "raise request_deadline= or check the server's health",
            )


def read_body(
    response: requests.Response, *, max_bytes: int, deadline: Deadline, cut: bool = False
) -> bytes:
    """Read the body of a streamed ``response`` (``stream=True``) into it (``.content``,
    ``.json()`` work after), under ``max_bytes`` (decoded) and the ``deadline``; HttpProblem
    if it passes one. ``cut``: keep the first ``max_bytes`` instead (an error's excerpt).

    urllib3 errors (a read timeout, a broken connection) propagate; the response is closed
    on any error.
    """
    try:
        body, whole = _read(response, max_bytes, deadline, cut)
    except BaseException:
        response.close()
        raise
    if not whole:
        response.close()  # bytes left unread: the connection cannot serve another request
    response._content = body
    response._content_consumed = True
    response.close()  # the body is consumed: this hands the connection back to the pool
    return body


def _read(
    response: requests.Response, max_bytes: int, deadline: Deadline, cut: bool
) -> tuple[bytes, bool]:
    """The body (or its first ``max_bytes`` if ``cut``) and whether it is all of it."""
    declared = response.headers.get("Content-Length", "").strip()
    if not cut and declared.isdigit() and int(declared) > max_bytes:
        raise HttpProblem(
            f"the body is {int(declared)} bytes (Content-Length), over max_body_bytes={max_bytes}",
            f"{_SMALLER_PAGES} or raise max_body_bytes=",
        )
    chunks: list[bytes] = []
    size = 0
    while True:
        deadline.check(f"{size} bytes of the body read")
        chunk = response.raw.read1(_CHUNK, decode_content=True)
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            if cut:
                return b"".join(chunks)[:max_bytes], False
            raise HttpProblem(
                f"the body passed max_body_bytes={max_bytes} ({size} bytes read, not all)",
                f"{_SMALLER_PAGES} or raise max_body_bytes=",
            )


def check_records(count: int, max_page_records: int) -> None:
    """HttpProblem if a page holds more than ``max_page_records`` records."""
    if count > max_page_records:
        raise HttpProblem(
            f"the page holds {count} records, over max_page_records={max_page_records}",
            f"{_SMALLER_PAGES} or raise max_page_records=",
        )


def check_planned_pages(count: int, page_limit: int) -> None:
    """HttpProblem if a plan has more than ``page_limit`` pages (before any fan-out)."""
    if count > page_limit:
        raise HttpProblem(
            f"the API reports {count} pages, over page_limit={page_limit}",
            "raise page_limit= if the API really has that many pages, or set the paginator's "
            "max_pages to read fewer on purpose",
        )


def check_pages_read(count: int, page_limit: int) -> None:
    """HttpProblem if a walk that read ``count`` pages and has a next one is at the limit."""
    if count >= page_limit:
        raise HttpProblem(
            f"{count} pages read and the API still names a next one: page_limit={page_limit}",
            "raise page_limit= if the API really has more pages, or set the paginator's "
            "max_pages to stop early on purpose",
        )


def check_seconds(value: Any, option: str) -> float:
    """``value`` if it is seconds > 0, else FlowDefinitionError naming ``option``."""
    if not is_seconds(value):
        raise FlowDefinitionError(f"{option} must be seconds > 0, got {value!r}.")
    return float(value)


def check_timeout(timeout: Any) -> float | tuple[float, float]:
    """``timeout`` if it is seconds > 0 or a (connect, read) pair of them."""
    values = timeout if isinstance(timeout, tuple) else (timeout,)
    if len(values) not in (1, 2) or not all(is_seconds(v) for v in values):
        raise FlowDefinitionError(
            f"timeout must be seconds > 0 or a (connect, read) pair of them, got {timeout!r}."
        )
    return timeout  # type: ignore[no-any-return]
