"""A paginated JSON API over HTTP, as a :class:`~flow_assets.sources.base.Source`.

Retries are urllib3's: connection errors, read timeouts and 429/500/502/503/504 answers are
retried with exponential backoff and jitter, honouring ``Retry-After``. Any other 4xx is not
retried: it will not get better, so it fails at once with the status and a body excerpt.
Credentials go to the source's origin only (``http_session``); sizes, times and page
counts are bounded (``http_limits``). Policy: docs/http-sources.md.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import SplitResult, urlsplit

import requests
from requests.auth import AuthBase

from flow_assets.errors import FlowDefinitionError, SourceError
from flow_assets.options import require_int, require_name, require_path
from flow_assets.sources import http_limits as limits
from flow_assets.sources.auth import BearerAuth
from flow_assets.sources.base import LazySequence, Page, PageRef
from flow_assets.sources.http_limits import HttpProblem
from flow_assets.sources.http_session import CROSS_ORIGIN, HttpTransport, Origin, origin_of
from flow_assets.sources.json_body import (
    MISSING,
    as_count,
    excerpt,
    json_kind,
    json_lookup,
    response_json,
    shown,
)
from flow_assets.sources.paginators import BasePaginator
from resources.redaction import redact_url

__all__ = ["BearerAuth", "HttpJsonSource"]

DEFAULT_TOTAL_HEADER = "X-Total-Count"


class HttpJsonSource(HttpTransport):
    """Records from a paginated JSON API.

    Random access (``plan`` lists every page, lazily) when the paginator learns the total
    from the first page; sequential (``pages`` walks them in order) otherwise.

    Args:
        url: the endpoint, ``http(s)://host/path``.
        paginator: how pages are addressed; see ``flow_assets.sources.paginators``.
        records_path: dotted path of the list of records in the body; None: the body is it.
        params: query parameters sent with every request.
        headers: headers sent with every request to the url's origin (they may hold keys:
            they are credentials, like ``auth``).
        auth: a requests auth object, e.g. ``BearerAuth(token)`` or ``("user", "password")``.
        cross_origin: what to do when a next link or a redirect leads to another origin
            (scheme, host or port) than the url's: ``"fail"`` (default) or
            ``"drop_credentials"`` (follow it without ``auth`` and ``headers``). An https
            source never follows a link or a redirect to http, in either mode.
        timeout: seconds to connect and to read (each socket wait), or a (connect, read) pair.
        request_deadline: seconds one request may take in all, from sending it to the last
            byte of its body, retries, their waits and redirects included (default 300); an
            overrun fails the request as a timeout, not retried by the source.
        max_body_bytes: largest response body read, decoded (default 16 MiB; its parsed
            JSON may take up to ~30 times as much memory).
        max_page_records: most records on one page (default 100,000).
        page_limit: most pages of one plan or walk (default 100,000): a safety limit that
            fails the read, where the paginator's ``max_pages`` stops it on purpose.
        max_retries: retries per request on connection errors, timeouts, 429 and 5xx.
        backoff_factor: exponential backoff base in seconds (jitter of the same size added).
        retry_after_max: longest ``Retry-After`` wait honoured, in seconds.
        partition_param: query parameter that receives the partition key.
        total_header: response header holding the number of records the API has for the
            request (default ``X-Total-Count``, read when it holds a count; a header named
            here must hold one); None: no header is read.
        total_path: dotted path of the number of records in the body, for paginators that
            do not read one themselves (cursors, next links, ``total_pages_path``).
        name: name used in errors and logs (default: host and path).

    Pages (read in order) and page refs (planned) carry the total the API reports in
    ``reported_total``: the paginator's total of records (``total_records_path``,
    ``total_path``, ``total_header``) if it reads one, else ``total_path``, else
    ``total_header``. The finalizer fails a run that read a different number of records.
    A paginator stopped by ``max_pages`` reads less on purpose: its pages report no total.
    A limit passed fails the request with a SourceError naming the option to raise.

    Examples:
        >>> from flow_assets.sources import PageNumberPaginator
        >>> HttpJsonSource(
        ...     "https://api.example.com/v1/orders",
        ...     paginator=PageNumberPaginator(base_page=1, total_pages_path="meta.pages"),
        ...     records_path="data",
        ...     auth=BearerAuth("s3cret"),
        ...     partition_param="date",
        ... )  # doctest: +ELLIPSIS
        HttpJsonSource(GET https://api.example.com/v1/orders, PageNumberPaginator(...))
    """

    def __init__(
        self,
        url: str,
        *,
        paginator: BasePaginator,
        records_path: str | None = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        auth: AuthBase | tuple[str, str] | None = None,
        cross_origin: str = "fail",
        timeout: float | tuple[float, float] = (5, 30),
        request_deadline: float = limits.DEFAULT_REQUEST_DEADLINE,
        max_body_bytes: int = limits.DEFAULT_MAX_BODY_BYTES,
        max_page_records: int = limits.DEFAULT_MAX_PAGE_RECORDS,
        page_limit: int = limits.DEFAULT_PAGE_LIMIT,
        max_retries: int = 5,
        backoff_factor: float = 0.5,
        retry_after_max: int = 60,
        partition_param: str | None = None,
        total_header: str | None = DEFAULT_TOTAL_HEADER,
        total_path: str | None = None,
        name: str | None = None,
    ) -> None:
        parts, origin = _checked_url(url)
        if not isinstance(paginator, BasePaginator):
            raise FlowDefinitionError(
                f"paginator must be one of flow_assets.sources.paginators, got {paginator!r}."
            )
        _check_fields(records_path, total_path, partition_param, total_header)
        _check_retries(max_retries, retry_after_max, backoff_factor)
        if cross_origin not in CROSS_ORIGIN:
            raise FlowDefinitionError(
                f"cross_origin must be one of {CROSS_ORIGIN}, got {cross_origin!r}."
            )
        self.max_body_bytes = require_int(max_body_bytes, "max_body_bytes", 1)
        self.max_page_records = require_int(max_page_records, "max_page_records", 1)
        self.page_limit = require_int(page_limit, "page_limit", 1)
        if paginator.max_pages is not None and paginator.max_pages > page_limit:
            raise FlowDefinitionError(
                f"the paginator's max_pages ({paginator.max_pages}) is over page_limit "
                f"({page_limit}), which would fail the read first: raise page_limit."
            )
        self.request_deadline = limits.check_seconds(request_deadline, "request_deadline")
        self.url = url
        self.paginator = paginator
        self.records_path = records_path
        self.params = dict(params or {})
        self.headers = dict(headers or {})
        self.auth = auth
        self.cross_origin = cross_origin
        self._origin = origin
        self.timeout = limits.check_timeout(timeout)
        self.max_retries = max_retries
        self.backoff_factor = float(backoff_factor)
        self.retry_after_max = retry_after_max
        self.partition_param = partition_param
        self.total_header = total_header
        self.total_path = total_path
        self.name = name or f"{parts.hostname}{parts.path}"
        self._session: requests.Session | None = None

    def __str__(self) -> str:
        return f"HttpJsonSource(GET {redact_url(self.url)}, {self.paginator})"

    __repr__ = __str__

    # -- the Source protocol ---------------------------------------------------------------

    def plan(self, partition_key: str | None) -> Sequence[PageRef] | None:
        """Every page's ref, learnt from page 0 (a lazy sequence, refused over
        ``page_limit`` pages); None if the paginator cannot know them."""
        if not self.paginator.random_access:
            return None
        paginator = copy.deepcopy(self.paginator)
        request = self._first_request(partition_key, paginator)
        response = self._send(request, 0)
        records = self._records(response, 0)
        try:
            page_params = paginator.page_params(response, records)
        except SourceError as exc:
            raise self._error(0, response.url, str(exc)) from None
        if page_params is None:
            return None
        with self._failing(0, response.url):
            limits.check_planned_pages(len(page_params), self.page_limit)
        base = self._base_params(partition_key)
        total = None if paginator.cut_short else self._reported_total(response, paginator, 0)

        def ref(index: int) -> PageRef:
            return PageRef(index, {**base, **page_params[index]}, reported_total=total)

        return LazySequence(range(len(page_params)), ref)

    def fetch(self, ref: PageRef) -> Page:
        """Fetch one planned page."""
        request = requests.Request("GET", self.url, params=dict(ref.params))
        response = self._send(request, ref.index)
        records = self._records(response, ref.index)
        return Page(ref.index, records, self._label(response), ref.reported_total)

    def pages(self, partition_key: str | None) -> Iterator[Page]:
        """Walk the pages in order. An empty page that ends the walk is not yielded: it only
        says there is nothing more (so an empty source yields no page)."""
        paginator = copy.deepcopy(self.paginator)
        request = self._first_request(partition_key, paginator)
        # max_pages may stop the walk before the end on purpose: then report no total.
        report = paginator.max_pages is None
        index = read = 0
        while True:
            response = self._send(request, index)
            read += 1
            records = self._records(response, index)
            try:
                paginator.update_state(response, records)
            except SourceError as exc:
                raise self._error(index, response.url, str(exc)) from None
            last = not paginator.has_next_page
            if not last:
                with self._failing(index, response.url):
                    limits.check_pages_read(read, self.page_limit)
            if records or not last:
                total = self._reported_total(response, paginator, index) if report else None
                yield Page(index, records, self._label(response), total)
                index += 1
            if last:
                return
            paginator.update_request(request)

    def close(self) -> None:
        """Close the HTTP connections (a new session opens on next use)."""
        if self._session is not None:
            self._session.close()
            self._session = None

    # -- helpers ----------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_session": None}

    def _base_params(self, partition_key: str | None) -> dict[str, Any]:
        params = dict(self.params)
        if self.partition_param is not None and partition_key is not None:
            params[self.partition_param] = partition_key
        return params

    def _first_request(
        self, partition_key: str | None, paginator: BasePaginator
    ) -> requests.Request:
        request = requests.Request("GET", self.url, params=self._base_params(partition_key))
        paginator.init_request(request)
        return request

    def _records(self, response: requests.Response, index: int) -> list[Any]:
        records = self._find_records(response, index)
        with self._failing(index, response.url):
            limits.check_records(len(records), self.max_page_records)
        return records

    def _find_records(self, response: requests.Response, index: int) -> list[Any]:
        try:
            body = response_json(response)
        except SourceError as exc:  # nested too deep to parse
            fix = "fix the API, or ask it for flatter records"
            raise self._error(index, response.url, str(exc), fix) from None
        except ValueError:
            kind = excerpt(response.headers.get("Content-Type", "no Content-Type"), 100)
            raise self._error(
                index,
                response.url,
                f"the body is not JSON ({kind}): {self._body_excerpt(response)!r}",
                "point url at the JSON endpoint of the API",
            ) from None
        if self.records_path is None:
            if not isinstance(body, list):
                raise self._error(
                    index,
                    response.url,
                    f"the body is {json_kind(body)}, not a list of records",
                    "set records_path to the field holding the records",
                )
            return body
        records = json_lookup(body, self.records_path)
        if records is MISSING:
            raise self._error(
                index,
                response.url,
                f"records_path {self.records_path!r} is not in the body, "
                f"which is {json_kind(body)}",
                "set records_path to the field holding the records",
            )
        if not isinstance(records, list):
            raise self._error(
                index,
                response.url,
                f"records_path {self.records_path!r} holds {json_kind(records)}, not a list",
                "set records_path to the field holding the list of records",
            )
        return records

    def _reported_total(
        self, response: requests.Response, paginator: BasePaginator, index: int
    ) -> int | None:
        """The record count the response reports (see the class docstring), if any, less
        the records before the paginator's first page (a starting offset)."""
        total = self._told_total(response, paginator, index)
        return None if total is None else max(0, total - paginator.skipped_records)

    def _told_total(
        self, response: requests.Response, paginator: BasePaginator, index: int
    ) -> int | None:
        try:
            total = paginator.total_records(response)
        except SourceError as exc:
            raise self._error(index, response.url, str(exc)) from None
        if total is not None:
            return total
        if self.total_path is not None:
            raw = json_lookup(response_json(response), self.total_path)
            if raw is not MISSING and raw is not None:
                return self._count(raw, f"total_path {self.total_path!r}", index, response)
        if self.total_header is not None:
            raw = response.headers.get(self.total_header)
            if raw is not None:
                if self.total_header.lower() == DEFAULT_TOTAL_HEADER.lower():
                    # Only the default: an API may send it with another meaning.
                    return as_count(raw)
                return self._count(raw, f"total header {self.total_header!r}", index, response)
        return None

    def _count(self, raw: Any, where: str, index: int, response: requests.Response) -> int:
        count = as_count(raw)
        if count is not None:
            return count
        raise self._error(
            index,
            response.url,
            f"{where} holds {shown(raw)}, not a non-negative integer",
            "point it at the record count the API sends, or set it to None",
        )

    def _label(self, response: requests.Response) -> str:
        return f"GET {redact_url(response.url)}"

    def _error(self, index: int, url: str, problem: str, fix: str | None = None) -> SourceError:
        problem = problem.rstrip(".")
        message = f"Source {self.name!r}, page {index} (GET {self._shown_url(url)}): {problem}."
        return SourceError(f"{message} Fix: {fix}." if fix else message)


def _checked_url(url: object) -> tuple[SplitResult, Origin]:
    """The parts and the origin of an http(s) URL; ``FlowDefinitionError`` (the URL
    redacted) for anything else."""
    if not isinstance(url, str):
        raise FlowDefinitionError(f"url must be an http(s)://host/path URL, got {url!r}.")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FlowDefinitionError(f"url must be an http(s)://host/path URL, got {redact_url(url)}.")
    try:
        return parts, origin_of(url)
    except HttpProblem as exc:
        raise FlowDefinitionError(f"url {redact_url(url)}: {exc.problem}.") from None


def _check_fields(
    records_path: str | None,
    total_path: str | None,
    partition_param: str | None,
    total_header: str | None,
) -> None:
    """Paths into the JSON body and names of a parameter and a header, where given."""
    for path, option in ((records_path, "records_path"), (total_path, "total_path")):
        if path is not None:
            require_path(path, option)
    for field, option in ((partition_param, "partition_param"), (total_header, "total_header")):
        if field is not None:
            require_name(field, option)


def _check_retries(max_retries: int, retry_after_max: int, backoff_factor: float) -> None:
    require_int(max_retries, "max_retries", 0)
    require_int(retry_after_max, "retry_after_max", 0)
    if not isinstance(backoff_factor, (int, float)) or backoff_factor < 0:
        raise FlowDefinitionError(f"backoff_factor must be >= 0, got {backoff_factor!r}.")
