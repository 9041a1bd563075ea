"""The requests of HttpJsonSource (:class:`HttpTransport`), and where its credentials go.

Credentials (``auth=``, and ``headers=`` which may hold keys) go only to the *origin*
(scheme, host, port) of the source's url. A next link or a redirect to another origin fails
(``cross_origin="fail"``, the default) or is requested without any of them
(``"drop_credentials"``). An https source never steps down to http, in either mode.
Redirects are followed by the source, not by requests (which strips only
``Authorization``, and only on a change of host), so each hop is checked like a link.
Cookies are kept for the source's origin only: a cookie is scoped to a host, not to a
port or a scheme, so requests would send it to every origin of that host. Bodies are read
under the limits of ``http_limits``; error excerpts mask credential echoes and personal data.

Origins are those of the URLs as requests sends them (:func:`sendable_url`): parsers
disagree on odd URLs (``http://a\\@b/`` is host b to urllib, host a to urllib3), and a
link whose host part holds a backslash, a control character or white space is refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from http.cookiejar import Cookie, DefaultCookiePolicy
from typing import Any, NamedTuple
from urllib.parse import urljoin, urlsplit
from urllib.request import Request

import requests
from requests.auth import AuthBase
from requests.utils import requote_uri
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import NewConnectionError, ReadTimeoutError
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util import parse_url
from urllib3.util.retry import Retry

from flow_assets.errors import SourceError
from flow_assets.sources import http_limits as limits
from flow_assets.sources.auth import mask_credentials, secret_values
from flow_assets.sources.base import SourceDownError
from flow_assets.sources.http_limits import Deadline, HttpProblem
from flow_assets.sources.json_body import excerpt
from resources.redaction import redact_url

CROSS_ORIGIN = ("fail", "drop_credentials")
MAX_REDIRECTS = 10
RETRY_STATUSES = (429, 500, 502, 503, 504)
# The start of a body that an excerpt is cut from: masked whole, then cut (a body may be
# 16 MiB; decoding and masking it all to show 200 characters would be a waste).
_EXCERPT_SOURCE_BYTES = 16 * 1024
_URL_CHARS = 500
_DEFAULT_PORTS = {"http": 80, "https": 443}
# The host part of a URL (after the scheme and its slashes, up to the path): a backslash
# ends it for urllib3 and browsers, not for urllib; control characters and white space
# are cut or kept depending on the parser.
_AUTHORITY = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.\-]*:[/\\]*([^/?#]*)")
_LINK_FIX = "have the API send well-formed http(s) links (or fix url=)"
# Headers whose values are secrets to mask by value in excerpts (all of headers= are
# credentials as to where they go, but "application/json" is no secret to mask).
_SECRET_HEADER = re.compile(r"(?i)auth|key|token|secret|passw|cookie|session|signature|credential")
_HINTS = {
    400: "check the query parameters (params=, partition_param=, the paginator's)",
    401: "check the credentials (auth=)",
    403: "check that the credentials (auth=) may read this endpoint",
    404: "check the URL and the partition key",
    422: "check the query parameters (params=, partition_param=, the paginator's)",
}


class Origin(NamedTuple):
    """Scheme, host and port: what a browser calls an origin (no user, no path)."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def sendable_url(url: str, params: Any = None, what: str = "the URL") -> str:
    """The URL requests sends for ``url`` and ``params``: origins are checked on it.
    HttpProblem (``what`` names the URL) if its host part holds a backslash, a control
    character or white space, or it is no http(s) URL with a host that requests can send.

    Examples:
        >>> sendable_url("http://api.test/a b", {"q": 1})
        'http://api.test/a%20b?q=1'
        >>> sendable_url("http://127.0.0.1:1\\\\@127.0.0.1:2/")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        flow_assets.sources.http_limits.HttpProblem: the URL is refused: its host part ...
    """
    authority = _AUTHORITY.match(url)
    bad = _odd_characters(authority[1] if authority else "")
    if bad:
        raise HttpProblem(
            f"{what} is refused: its host part holds {bad}, which parsers read differently"
            " (the host could be another than it seems)",
            _LINK_FIX,
        )
    try:
        prepared = requests.Request("GET", url, params=params).prepare().url or ""
        parts = parse_url(prepared)
    except (requests.RequestException, ValueError) as exc:  # InvalidURL, LocationParseError
        reason = f"{type(exc).__name__}: {excerpt(str(exc))}"  # the URL in it masked
        raise HttpProblem(f"{what} cannot be requested ({reason})", _LINK_FIX) from None
    if parts.scheme not in _DEFAULT_PORTS or not parts.host:
        raise HttpProblem(f"{what} is not an http(s) URL with a host", _LINK_FIX)
    return prepared


def _odd_characters(authority: str) -> str | None:
    if "\\" in authority:
        return "a backslash"
    if any(c.isspace() or not c.isprintable() for c in authority):
        return "white space or a control character"
    return None


def origin_of(url: str) -> Origin:
    """The origin of ``url`` as requests sends it, default ports filled in; HttpProblem if
    requests would not send it (see :func:`sendable_url`).

    Examples:
        >>> origin_of("https://API.example.com/v1?page=2") == origin_of("https://api.example.com:443")
        True
        >>> str(origin_of("http://user:pw@127.0.0.1:8080/x"))
        'http://127.0.0.1:8080'
    """
    parts = parse_url(sendable_url(url))
    scheme, host = str(parts.scheme), str(parts.host).lower()
    if host.startswith("["):  # an IPv6 address
        host = host[1:-1]
    return Origin(scheme, host, parts.port or _DEFAULT_PORTS[scheme])


def _same_origin(url: str, origin: Origin) -> bool:
    try:
        return origin_of(url) == origin
    except HttpProblem:
        return False


def may_send_credentials(source: Origin, url: str, cross_origin: str, via: str) -> bool:
    """Whether a request to ``url`` (as :func:`sendable_url` gives it) may carry the
    source's credentials: True for the source's origin, False for another under
    ``drop_credentials``. HttpProblem for another under ``fail``, and for any step from https
    down to http. ``via``: how the source got to ``url`` ("the next link", "a redirect")."""
    target = origin_of(url)
    if source.scheme == "https" and target.scheme != "https":
        raise HttpProblem(
            f"{via} leads from https down to {target.scheme} ({target}): an https source is "
            "never read over plain http",
            "have the API link and redirect to https URLs (no option allows a downgrade)",
        )
    if target == source:
        return True
    if cross_origin == "drop_credentials":
        return False
    raise HttpProblem(
        f"{via} leads to another origin, {target}, than the source's, {source}; credentials "
        "(auth=, headers=) go to the source's origin only",
        "set cross_origin='drop_credentials' to follow it without credentials, or set url "
        "to that origin if the API lives there",
    )


def redirect_url(session: requests.Session, response: requests.Response) -> str | None:
    """The absolute URL a redirect answer points at; None if ``response`` is no redirect."""
    target = session.get_redirect_target(response)
    return None if target is None else requote_uri(urljoin(response.url, target))


class _OriginCookiePolicy(DefaultCookiePolicy):
    """Keeps the cookies set by one origin only (another could plant some for it)."""

    def __init__(self, origin: Origin) -> None:
        super().__init__()
        self.origin = origin

    def set_ok(self, cookie: Cookie, request: Request) -> bool:
        same = _same_origin(request.get_full_url(), self.origin)
        return same and super().set_ok(cookie, request)


class _OriginSession(requests.Session):
    """A session whose cookies go to one origin only."""

    def __init__(self, origin: Origin) -> None:
        super().__init__()
        self.origin = origin
        self.cookies.set_policy(_OriginCookiePolicy(origin))

    def prepare_request(self, request: requests.Request) -> requests.PreparedRequest:
        prepared = super().prepare_request(request)
        # The jar is merged into a fresh one per request (its policy lost): filter here.
        if not _same_origin(prepared.url or "", self.origin):
            prepared.headers.pop("Cookie", None)
        return prepared


def new_session(
    origin: Origin, *, max_retries: int, backoff_factor: float, retry_after_max: int
) -> requests.Session:
    """A session with urllib3 retries, its cookies kept to ``origin``, no credentials of
    its own (they are given per request, to the origin's requests only)."""
    retry = limits.DeadlineRetry(
        total=max_retries,
        backoff_factor=backoff_factor,
        # Jitter spreads the retries of page steps that failed together.
        backoff_jitter=backoff_factor,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=frozenset({"GET"}),
        respect_retry_after_header=True,
        # Hand back the last response so the error can show its status and body.
        raise_on_status=False,
        **_retry_after_cap(retry_after_max),
    )
    session = _OriginSession(origin)
    session.mount("http://", limits.WatchedAdapter(max_retries=retry))
    session.mount("https://", limits.WatchedAdapter(max_retries=retry))
    return session


def _retry_after_cap(seconds: int) -> dict[str, Any]:
    # Only recent urllib3 releases cap Retry-After; older ones wait as long as asked.
    if hasattr(Retry, "DEFAULT_RETRY_AFTER_MAX"):
        return {"retry_after_max": seconds}
    return {}


class HttpTransport:
    """The requests of :class:`~flow_assets.sources.HttpJsonSource`: it sets the options
    below and makes SourceErrors with ``_error``; this sends, checks and reads."""

    url: str
    headers: dict[str, str]
    auth: AuthBase | tuple[str, str] | None
    cross_origin: str
    timeout: float | tuple[float, float]
    request_deadline: float
    max_body_bytes: int
    max_retries: int
    backoff_factor: float
    retry_after_max: int
    _origin: Origin
    _session: requests.Session | None

    def _error(self, index: int, url: str, problem: str, fix: str | None = None) -> SourceError:
        raise NotImplementedError

    @contextmanager
    def _failing(self, index: int, url: str) -> Iterator[None]:
        """Raise an HttpProblem of the block as this source's SourceError for the page."""
        try:
            yield
        except HttpProblem as exc:
            raise self._error(index, url, exc.problem, exc.fix) from None

    @property
    def session(self) -> requests.Session:
        """The requests session with retries, created on first use (and not pickled). It
        holds no credentials: ``_get`` gives them to the source's origin's requests only."""
        if self._session is None:
            self._session = new_session(
                self._origin,
                max_retries=self.max_retries,
                backoff_factor=self.backoff_factor,
                retry_after_max=self.retry_after_max,
            )
        return self._session

    def _send(self, request: requests.Request, index: int) -> requests.Response:
        """GET the request's URL and read its body under the limits. Redirects are followed
        here, each hop checked like a next link (credentials to the source's origin only)."""
        deadline = Deadline(self.request_deadline)
        url, params, via = str(request.url), request.params, "the next link"
        with deadline.watching():
            for _hop in range(MAX_REDIRECTS + 1):
                with self._failing(index, url):
                    url = sendable_url(url, params, via)
                    deadline.check("following redirects")
                    trusted = may_send_credentials(self._origin, url, self.cross_origin, via)
                response = self._get(url, trusted, index, deadline)
                target = redirect_url(self.session, response)
                if target is None:
                    return self._read(response, index, deadline)
                response.close()
                via = f"a redirect (HTTP {response.status_code} from {self._shown_url(url)})"
                url, params = target, None
        raise self._error(
            index, url, f"more than {MAX_REDIRECTS} redirects", "set url to the API's address"
        )

    def _get(self, url: str, trusted: bool, index: int, deadline: Deadline) -> requests.Response:
        """One hop: the response with its headers, its body not read yet."""
        with self._failing(index, url):  # the deadline, met in urllib3's retries
            try:
                return self.session.get(
                    url,
                    headers=self.headers if trusted else None,
                    auth=self.auth if trusted else None,
                    timeout=self.timeout,
                    allow_redirects=False,
                    stream=True,
                )
            except requests.RequestException as exc:
                deadline.check("waiting for the answer")  # the watchdog cut the connection
                raise self._request_failed(exc, index, url) from None

    def _request_failed(self, exc: requests.RequestException, index: int, url: str) -> SourceError:
        # requests wraps urllib3's last error (after the retries) in its own exception.
        reason = getattr(exc.args[0], "reason", None) if exc.args else None
        reason = reason or exc
        # NewConnectionError subclasses urllib3's timeout error, yet is a refusal.
        timed_out = isinstance(exc, requests.Timeout) or isinstance(reason, Urllib3Timeout)
        if timed_out and not isinstance(reason, NewConnectionError):
            problem = f"timed out (timeout={self.timeout!r} s)"
            fix = "raise timeout= or check the server's health"
        else:
            problem = f"request failed: {type(reason).__name__}: {self._excerpt(str(reason))}"
            fix = "check that the server is up and reachable from here"
        error = self._error(index, url, f"{problem}, after {self.max_retries} retries", fix)
        # No connection after every retry: the source is down, not this one page. (A read
        # timeout is the server being slow on a page: that page may fare better.)
        if isinstance(exc, requests.ConnectionError) and not isinstance(reason, ReadTimeoutError):
            return SourceDownError(str(error))
        return error

    def _read(
        self, response: requests.Response, index: int, deadline: Deadline
    ) -> requests.Response:
        """Read the body (of an error answer: its start only); the response, or the error."""
        failed = response.status_code >= 400
        size = limits.ERROR_BODY_BYTES if failed else self.max_body_bytes
        try:
            with self._failing(index, response.url):
                limits.read_body(response, max_bytes=size, deadline=deadline, cut=failed)
        except Urllib3Error as exc:
            # Not retried: urllib3 retries before a body is read, never while reading it.
            if isinstance(exc, ReadTimeoutError):
                problem = f"timed out reading the body (timeout={self.timeout!r} s)"
            else:
                problem = f"reading the body failed: {type(exc).__name__}: {exc}"
            fix = "raise timeout= or check the server's health"
            raise self._error(index, response.url, self._excerpt(problem), fix) from None
        if failed:
            retried = response.status_code in RETRY_STATUSES
            raise self._error(
                index,
                response.url,
                f"HTTP {response.status_code}"
                + (f" still, after {self.max_retries} retries" if retried else " (not retried)")
                + f"; body: {self._body_excerpt(response)!r}",
                _HINTS.get(response.status_code, "check the API's status and documentation"),
            )
        return response

    def _body_excerpt(self, response: requests.Response) -> str:
        start = response.content[:_EXCERPT_SOURCE_BYTES]
        try:
            text = start.decode(response.encoding or "utf-8", errors="replace")
        except LookupError:  # the server named a charset Python does not know
            text = start.decode("utf-8", errors="replace")
        return self._excerpt(text)

    def _excerpt(self, text: str) -> str:
        """The start of ``text`` for an error: credentials (the source's own, and any that
        look like one), URL secrets and personal data masked, then cut."""
        text = " ".join(text[: 4 * _EXCERPT_SOURCE_BYTES].split())
        return excerpt(mask_credentials(text, self._secrets()))

    def _secrets(self) -> list[str]:
        """The secret values this source sends: its auth's, its secret-named headers'
        (``Authorization``, ``X-API-Key``, ``X-Auth-Token``, cookies...), its url's password."""
        password = urlsplit(self.url).password
        headers = [v for k, v in self.headers.items() if _SECRET_HEADER.search(k)]
        return [*secret_values(self.auth), *headers, *filter(None, [password])]

    def _shown_url(self, url: str) -> str:
        """``url`` for an error: secrets masked, unprintable characters escaped, cut."""
        shown = redact_url(url)
        cut = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in shown[:_URL_CHARS])
        return cut if len(shown) <= _URL_CHARS else cut + "..."
