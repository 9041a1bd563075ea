"""Limits that keep a hostile or broken HTTP API from exhausting a step.

Every one has a default and an option of :class:`~flow_assets.sources.HttpJsonSource`;
a request that passes one fails with the limit, the value seen and the option to raise:

* ``max_body_bytes``: the size of a response body (``Content-Length`` is checked before
  reading; the body is read in chunks and the read stops once over);
* ``request_deadline``: the wall-clock time of one request, from sending it to the last
  byte of its body, retries and redirects included (timeouts bound each socket wait only:
  a server sending a few bytes a second never trips them). urllib3's retries stop at it,
  and a watchdog shuts the request's socket down when it passes, whatever is being read;
* ``max_page_records``: the records on one page;
* ``page_limit``: the pages of one walk or plan. A safety limit: passing it fails the read,
  where a paginator's ``max_pages`` stops it early on purpose.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import requests
from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool, PoolManager
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.util.retry import Retry

from flow_assets.errors import FlowDefinitionError
from flow_assets.options import is_seconds

if TYPE_CHECKING:
    from typing_extensions import Self

MIB = 1024 * 1024
# Parsed JSON takes up to ~30 times its text (``[{},{},...]``: a dict per 3 bytes).
DEFAULT_MAX_BODY_BYTES = 16 * MIB
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
    """The wall clock of one request: ``seconds`` from its start.

    Within :meth:`watching`, urllib3's retries (:class:`DeadlineRetry`) stop at it and a
    watchdog shuts down the request's socket once it passes: http.client reads the headers
    of an answer byte by byte, each read within the read timeout, in any total time.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._conn: Any = None  # the urllib3 connection the request uses now
        self._timer: threading.Timer | None = None

    def left(self) -> float:
        """Seconds left (negative once passed)."""
        return self._end - time.monotonic()

    def check(self, progress: str) -> None:
        """HttpProblem if the time is up; ``progress`` says how far the request got."""
        if self.left() < 0:
            raise HttpProblem(
                f"timed out: the request took longer than request_deadline={self.seconds:g} s"
                f" ({progress}); not retried",
                "raise request_deadline= or check the server's health",
            )

    def check_wait(self, seconds: float) -> None:
        """HttpProblem if a retry's wait of ``seconds`` would pass the deadline."""
        self.check("before a retry")
        if seconds > self.left():
            raise HttpProblem(
                f"timed out: the next retry would wait {seconds:g} s, past "
                f"request_deadline={self.seconds:g} s ({max(self.left(), 0):.1f} s left)",
                "raise request_deadline= (the retries' waits count), or lower max_retries=, "
                "backoff_factor= or retry_after_max=",
            )

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Make this the deadline of the requests sent in the block (this thread's)."""
        token = _CURRENT.set(self)
        with self._lock:
            self._arm(max(self.left(), 0))
        try:
            yield
        finally:
            with self._lock:
                timer, self._timer, self._conn = self._timer, None, None
            if timer is not None:
                timer.cancel()
            _CURRENT.reset(token)

    def watch(self, conn: Any) -> None:
        """Watch ``conn``, the connection a request (or its retry) takes from its pool."""
        with self._lock:
            self._conn = conn
            if self.left() < 0:
                _shut_down(conn)

    def _arm(self, seconds: float) -> None:
        # Capped: a Timer cannot wait past threading.TIMEOUT_MAX (request_deadline=inf).
        self._timer = threading.Timer(min(max(seconds, 0), _DAY), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if self._timer is None:  # the block ended
                return
            left = self.left()
            if left <= 0:
                _shut_down(self._conn)
            # Again soon, until the block ends: a connection may have been opening.
            self._arm(left if left > 0 else _RECHECK_SECONDS)


# The deadline of the request this thread is sending (see Deadline.watching).
_CURRENT: ContextVar[Deadline | None] = ContextVar("request_deadline", default=None)
_RECHECK_SECONDS = 0.1
_DAY = 86_400.0


def _shut_down(conn: Any) -> None:
    """Shut the socket of ``conn`` down: a read blocked on it (another thread's) returns."""
    sock = getattr(conn, "sock", None)
    if isinstance(sock, socket.socket):
        with suppress(OSError):
            # The plain socket's method: an SSLSocket's would drop its TLS state under the
            # reading thread.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


class DeadlineRetry(Retry):
    """urllib3's Retry, stopped by the request's deadline: no retry once it has passed,
    and no wait that would pass it (a Retry-After of a minute fails at once).

    An answer about to be retried is closed unread: urllib3 would read all its body to
    reuse the connection, into memory and at the server's pace (a huge or dripping 503
    would hold the step). Its connection is lost; retries are rare."""

    def increment(self, *args: Any, **kwargs: Any) -> Self:
        response = kwargs.get("response")
        deadline = _CURRENT.get()
        if deadline is not None and deadline.left() < 0:
            if response is not None:
                response.close()
            deadline.check(f"no answer after {len(self.history) + 1} attempt(s)")
        retry = super().increment(*args, **kwargs)  # MaxRetryError: the last answer is kept
        if response is not None:
            response.close()
        return retry

    def sleep(self, response: Any = None) -> None:
        # urllib3's choice: the answer's Retry-After if any, else the backoff.
        after = self.get_retry_after(response) if response is not None else None
        wait = after if after and self.respect_retry_after_header else self.get_backoff_time()
        deadline = _CURRENT.get()
        if deadline is not None:
            deadline.check_wait(wait)
        if wait > 0:
            time.sleep(wait)


class _WatchedPool(HTTPConnectionPool):
    """A urllib3 pool whose connections are watched by their request's deadline."""

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)
        deadline = _CURRENT.get()
        if deadline is not None:
            deadline.watch(conn)
        return conn


class WatchedAdapter(HTTPAdapter):
    """requests' adapter whose connections are shut down at their request's deadline."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        _watch_pools(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> PoolManager:
        manager = super().proxy_manager_for(proxy, **kwargs)
        _watch_pools(manager)
        return manager


def _watch_pools(manager: PoolManager) -> None:
    """Have ``manager`` make watched pools (of the same classes: http, https, socks)."""
    manager.pool_classes_by_scheme = {
        scheme: cls if issubclass(cls, _WatchedPool) else _watched(cls)
        for scheme, cls in manager.pool_classes_by_scheme.items()
    }


_WATCHED: dict[type, type] = {}


def _watched(cls: type) -> type:
    if cls not in _WATCHED:
        _WATCHED[cls] = type(f"Watched{cls.__name__}", (_WatchedPool, cls), {})
    return _WATCHED[cls]


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
        progress = f"{size} bytes of the body read"
        deadline.check(progress)
        try:
            chunk = response.raw.read1(_CHUNK, decode_content=True)
        except Urllib3Error:
            deadline.check(progress)  # the watchdog shut the socket down
            raise
        if not chunk:
            deadline.check(progress)  # the end, or the watchdog's shutdown
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
