"""A real JSON API on 127.0.0.1 that serves a list of records in pages, for tests.

``serve_records`` runs an ``http.server.ThreadingHTTPServer`` on a free port in a thread and
returns its base URL. The URL is a ``str`` with extras: a request log and ``inject`` to make
chosen requests fail (a status, a ``Retry-After``, a non-JSON body, a delay). The records are
served at every path, so ``api`` and ``api + "/orders"`` are both endpoints. (Being a str,
``api`` keeps str's methods: the log helpers are ``requests`` and ``count_requests``.)

Styles (``records_key`` names the list; None serves the bare list)::

    page_number  ?page=N (from base_page)  {"items": [...], "page": N, "total_pages": P, "total": R}
    offset       ?offset=O&limit=L         {"items": [...], "total": R} + X-Total-Count: R
    cursor       ?cursor=C                 {"items": [...], "next_cursor": "c10" | null}
    json_link    ?page=N (0-based)         {"items": [...], "next": "/path?page=N+1" | null}
    link_header  ?page=N (0-based)         {"items": [...]} + Link: <...>; rel="next", rel="last"
    single       (ignores the query)       {"items": [every record]}

``include_total=False`` leaves the totals (body and header) out. ``tls=True`` serves HTTPS
with a fresh self-signed certificate for 127.0.0.1 (``api.ca_file``: trust it with
``REQUESTS_CA_BUNDLE``). Two servers are two origins (another port): one can play the
foreign host that a next link or a redirect points at (``inject(headers={"Location": ...})``).

Examples:
    >>> with serve_records([{"id": i} for i in range(25)], page_size=10) as api:  # doctest: +SKIP
    ...     api.inject(status=503, nth=1, retry_after="0")   # the first request gets a 503
    ...     paginator = PageNumberPaginator(total_pages_path="total_pages")
    ...     source = HttpJsonSource(api, paginator=paginator, records_path="items")
    ...     assert len(list(source.pages(None))) == 3
    ...     assert api.count_requests() == 4  # the 503, then pages 0, 1 and 2
"""

from __future__ import annotations

import json
import math
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

HOST = "127.0.0.1"
STYLES = ("page_number", "offset", "cursor", "json_link", "link_header", "single")
LINK_FORMS = ("path", "query", "absolute")

Records = Sequence[Any] | Callable[[dict[str, str]], Sequence[Any]]


@dataclass(frozen=True)
class LoggedRequest:
    """One request the server answered."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    status: int
    injected: bool


@dataclass
class _Rule:
    status: int
    nth: int
    times: int | None
    path: str | None
    query: dict[str, str]
    retry_after: str | None
    body: str | None
    content_type: str
    delay: float
    headers: dict[str, str] = field(default_factory=dict)
    drip: tuple[int, float] | None = None
    drip_head: float | None = None
    content_length: bool = True
    seen: int = 0

    def fires(self, path: str, query: Mapping[str, str]) -> bool:
        """Count a matching request; True if this one is to be answered by the rule."""
        if self.path is not None and path != self.path:
            return False
        if any(query.get(k) != v for k, v in self.query.items()):
            return False
        self.seen += 1
        return self.seen >= self.nth and (self.times is None or self.seen < self.nth + self.times)


@dataclass
class _Options:
    records: Records
    page_size: int
    style: str
    records_key: str | None
    include_total: bool
    base_page: int
    links: str


class ServedApi(str):
    """The base URL of a running :func:`serve_records` server, plus its log and hooks."""

    _options: _Options
    _rules: list[_Rule]
    _log: list[LoggedRequest]
    _lock: threading.Lock
    ca_file: str | None

    def __new__(cls, url: str, options: _Options) -> ServedApi:
        api = super().__new__(cls, url)
        api._options = options
        api._rules = []
        api._log = []
        api._lock = threading.Lock()
        api.ca_file = None
        return api

    @property
    def url(self) -> str:
        """The base URL as a plain str."""
        return str.__str__(self)

    @property
    def requests(self) -> list[LoggedRequest]:
        """A copy of the request log, oldest first."""
        with self._lock:
            return list(self._log)

    def count_requests(self, path: str | None = None, **query: str) -> int:
        """Requests answered so far, to ``path`` (any if None) with these query values."""
        return sum(
            1
            for r in self.requests
            if (path is None or r.path == path)
            and all(r.query.get(k) == v for k, v in query.items())
        )

    def inject(
        self,
        *,
        status: int = 200,
        nth: int = 1,
        times: int | None = 1,
        path: str | None = None,
        query: Mapping[str, str] | None = None,
        retry_after: str | None = None,
        body: str | None = None,
        content_type: str | None = None,
        delay: float = 0.0,
        headers: Mapping[str, str] | None = None,
        drip: tuple[int, float] | None = None,
        drip_head: float | None = None,
        content_length: bool = True,
    ) -> None:
        """Answer matching requests ``nth`` to ``nth + times - 1`` (1-based; ``times=None``:
        every one from ``nth`` on) with ``status``, a ``Retry-After`` header, ``body`` (default:
        the normal page for 2xx, an error object otherwise) and ``headers`` (``Location``,
        ``Set-Cookie``, ``Link``) after ``delay`` s, if they match ``path`` (any if None) and
        the ``query`` values given. ``drip=(n, seconds)`` sends the body ``n`` bytes at a time,
        ``seconds`` apart (a slow server that never trips a read timeout), ``drip_head=seconds``
        the status line and headers a byte at a time; ``content_length=False`` sends no
        ``Content-Length`` (the body ends when the connection closes)."""
        rule = _Rule(
            status=status,
            nth=nth,
            times=times,
            path=path,
            query={k: str(v) for k, v in (query or {}).items()},
            retry_after=retry_after,
            body=body,
            content_type=content_type or ("text/plain" if body is not None else "application/json"),
            delay=delay,
            headers=dict(headers or {}),
            drip=drip,
            drip_head=drip_head,
            content_length=content_length,
        )
        with self._lock:
            self._rules.append(rule)

    def _match(self, path: str, query: Mapping[str, str]) -> _Rule | None:
        with self._lock:
            fired = [rule for rule in self._rules if rule.fires(path, query)]
        return fired[0] if fired else None

    def _record(self, entry: LoggedRequest) -> None:
        with self._lock:
            self._log.append(entry)


class _BadQuery(ValueError):
    pass


def _int(query: Mapping[str, str], name: str, default: int) -> int:
    try:
        value = int(query.get(name, default))
    except ValueError:
        raise _BadQuery(f"{name} must be an integer") from None
    if value < 0:
        raise _BadQuery(f"{name} must be >= 0")
    return value


def _page(api: ServedApi, path: str, query: dict[str, str]) -> tuple[Any, dict[str, str]]:
    """The body and extra headers of the normal answer to this request."""
    opts = api._options
    records = list(opts.records(query) if callable(opts.records) else opts.records)
    size, total, style = opts.page_size, len(records), opts.style
    headers: dict[str, str] = {}
    extra: dict[str, Any] = {}
    if style == "offset":
        start = _int(query, "offset", 0)
        end = start + _int(query, "limit", size)
        if opts.include_total:
            extra["total"] = total
            headers["X-Total-Count"] = str(total)
    elif style == "cursor":
        cursor = query.get("cursor", "c0")
        if not cursor.startswith("c") or not cursor[1:].isdigit():
            raise _BadQuery(f"unknown cursor {cursor!r}")
        start, end = int(cursor[1:]), int(cursor[1:]) + size
        extra["next_cursor"] = f"c{end}" if end < total else None
    elif style == "single":
        start, end = 0, total
    else:
        base = opts.base_page if style == "page_number" else 0
        page = _int(query, "page", base) - base
        if page < 0:
            raise _BadQuery(f"page must be >= {base}")
        start, end = page * size, (page + 1) * size
        pages = math.ceil(total / size)
        if style == "page_number":
            extra["page"] = page + base
            if opts.include_total:
                extra.update(total_pages=pages, total=total)
        else:

            def link(n: int) -> str:
                target = urlencode({**query, "page": n})
                if opts.links == "query":
                    return f"?{target}"
                prefix = api.url if opts.links == "absolute" else ""
                return f"{prefix}{path}?{target}"

            next_url = link(page + 1) if end < total else None
            if style == "json_link":
                extra["next"] = next_url
            else:
                links = [f'<{next_url}>; rel="next"'] if next_url else []
                links.append(f'<{link(max(pages - 1, 0))}>; rel="last"')
                headers["Link"] = ", ".join(links)
    chunk = records[start:end]
    if opts.records_key is None:
        return chunk, headers
    return {opts.records_key: chunk, **extra}, headers


def _handler(api: ServedApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
            rule = api._match(parts.path, query)
            status, content_type = 200, "application/json"
            headers: dict[str, str] = {}
            drip, drip_head, content_length = None, None, True
            try:
                body, headers = _page(api, parts.path, query)
                payload = json.dumps(body).encode()
            except _BadQuery as exc:
                status, payload = 400, json.dumps({"error": str(exc)}).encode()
            if rule is not None:
                time.sleep(rule.delay)
                status, content_type = rule.status, rule.content_type
                if rule.retry_after is not None:
                    headers["Retry-After"] = rule.retry_after
                headers.update(rule.headers)
                drip, drip_head, content_length = rule.drip, rule.drip_head, rule.content_length
                if rule.body is not None:
                    payload = rule.body.encode()
                elif status >= 400:
                    payload = json.dumps({"error": f"injected HTTP {status}"}).encode()
            api._record(
                LoggedRequest(
                    "GET", parts.path, query, dict(self.headers.items()), status, rule is not None
                )
            )
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            if content_length:
                self.send_header("Content-Length", str(len(payload)))
            for name, value in headers.items():
                self.send_header(name, value)
            # The status line and headers that send_header buffered: at once, or dripped.
            head, self._headers_buffer = b"".join(self._headers_buffer) + b"\r\n", []
            _drip(self.wfile, head, (len(head), 0) if drip_head is None else (1, drip_head))
            _drip(self.wfile, payload, drip or (max(len(payload), 1), 0))

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep pytest output clean; the log is api.requests

    return Handler


def _drip(wfile: Any, data: bytes, drip: tuple[int, float]) -> None:
    size, pause = drip
    for start in range(0, len(data), size):
        wfile.write(data[start : start + size])
        wfile.flush()
        time.sleep(pause)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (read timeout tests) closes the socket under the handler.
        pass


@contextmanager
def serve_records(
    records: Records,
    page_size: int = 10,
    *,
    style: str = "page_number",
    records_key: str | None = "items",
    include_total: bool = True,
    base_page: int = 0,
    links: str = "path",
    tls: bool = False,
) -> Iterator[ServedApi]:
    """Serve ``records`` in pages of ``page_size`` until the block exits.

    Args:
        records: the records, or a function of the query (``{name: first value}``) giving
            them, e.g. to serve one partition's records per ``?date=``.
        page_size: records per page (``offset`` honours ``?limit=`` instead).
        style: one of ``STYLES``; see the module docstring.
        records_key: key of the records list in the body; None serves the bare list.
        include_total: put the totals in the body (and ``X-Total-Count``).
        base_page: number of the first page for ``page_number``.
        links: next links as ``path`` (``/p?page=2``), ``query`` (``?page=2``) or
            ``absolute`` (``http://127.0.0.1:port/p?page=2``).
        tls: serve HTTPS with a self-signed certificate (needs the ``openssl`` command);
            ``api.ca_file`` is the certificate to trust.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if links not in LINK_FORMS:
        raise ValueError(f"links must be one of {LINK_FORMS}, got {links!r}")
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    options = _Options(records, page_size, style, records_key, include_total, base_page, links)
    server = _Server((HOST, 0), BaseHTTPRequestHandler)
    certs = tempfile.mkdtemp(prefix="httpfixture-") if tls else None
    scheme = "https" if tls else "http"
    api = ServedApi(f"{scheme}://{HOST}:{server.server_address[1]}", options)
    if certs is not None:
        api.ca_file = _serve_tls(server, Path(certs))
    server.RequestHandlerClass = _handler(api)
    # A short poll keeps shutdown() fast (it waits for the loop's next poll).
    thread = threading.Thread(
        target=server.serve_forever, args=(0.02,), name="serve_records", daemon=True
    )
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        if certs is not None:
            shutil.rmtree(certs, ignore_errors=True)


def _serve_tls(server: _Server, directory: Path) -> str:
    """Wrap ``server``'s socket in TLS with a new self-signed certificate for 127.0.0.1;
    the certificate's path (a client trusts it as its CA bundle)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    if shutil.which("openssl") is None:  # fail, never skip: the TLS tests guard credentials
        raise RuntimeError("the TLS tests make their certificate with openssl: install it")
    command = (
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1"
        f" -subj /CN={HOST} -addext subjectAltName=IP:{HOST} -keyout {key} -out {cert}"
    )
    subprocess.run(command.split(), check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return str(cert)
