"""Paginators: how to ask an HTTP API for the next page, and when to stop.

The protocol is dlt's REST-client one (``init_request``, ``update_state``, ``update_request``,
``has_next_page``), written here so the package does not depend on dlt. A paginator holds the
state of one walk through the pages; the source copies it for every walk.

Stop conditions are explicit: an empty page (``stop_after_empty_page``), the total reached, no
next cursor or link, or ``max_pages`` pages read. A cursor or a next link met before is an
error, not a loop. Paginators that learn the total from the first response (page numbers
or offsets with a total) are *random access*: ``page_params`` returns the parameters of
every page (a lazy sequence: a total of a billion costs nothing until read), so pages can
be fetched in parallel and out of order.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import urljoin

from requests import Request, Response

from flow_assets.errors import FlowDefinitionError, SourceError
from flow_assets.options import require_int, require_name, require_path
from flow_assets.sources.base import LazySequence
from flow_assets.sources.json_body import MISSING, json_kind, json_lookup, response_json

__all__ = [
    "BasePaginator",
    "HeaderLinkPaginator",
    "JSONCursorPaginator",
    "JSONLinkPaginator",
    "OffsetPaginator",
    "PageNumberPaginator",
]


def _fingerprint(value: Any) -> bytes:
    """A short digest of a cursor or URL: the walk remembers every one it met, so their
    memory is bounded per page whatever the API sends."""
    return hashlib.blake2b(repr(value).encode(), digest_size=16).digest()


def _optional(check: Any, value: Any, *args: Any) -> Any:
    return None if value is None else check(value, *args)


def _params_of(request: Request) -> dict[str, Any]:
    return dict(cast(Any, request.params) or {})


def _set_param(request: Request, name: str, value: Any) -> None:
    request.params = {**_params_of(request), name: value}


class BasePaginator(ABC):
    """One walk through the pages of an API; subclasses say how to move and when to stop.

    Args:
        max_pages: stop after this many pages even if the API has more (None: no limit).
        stop_after_empty_page: stop when a page has no records.

    Attributes:
        cut_short: ``page_params`` left pages out because of ``max_pages`` (the read is
            short on purpose: the API's total is not what it reads).
    """

    def __init__(self, *, max_pages: int | None, stop_after_empty_page: bool) -> None:
        self.max_pages = _optional(require_int, max_pages, "max_pages", 1)
        if not isinstance(stop_after_empty_page, bool):
            raise FlowDefinitionError(
                f"stop_after_empty_page must be True or False, got {stop_after_empty_page!r}."
            )
        self.stop_after_empty_page = stop_after_empty_page
        self._has_next_page = True
        self._pages_seen = 0
        self.cut_short = False

    @property
    def has_next_page(self) -> bool:
        """Whether ``update_request`` can point the request at another page."""
        return self._has_next_page

    @property
    def random_access(self) -> bool:
        """Whether ``page_params`` can list every page after the first response."""
        return False

    def init_request(self, request: Request) -> None:
        """Reset the walk and point ``request`` at the first page."""
        self._has_next_page = True
        self._pages_seen = 0
        self._start(request)

    def update_state(self, response: Response, records: list[Any]) -> None:
        """Learn from the page just read (its response and records) whether to go on."""
        self._pages_seen += 1
        if self.stop_after_empty_page and not records:
            self._has_next_page = False
            return
        self._advance(response, records)
        if self.max_pages is not None and self._pages_seen >= self.max_pages:
            self._has_next_page = False

    @abstractmethod
    def update_request(self, request: Request) -> None:
        """Point ``request`` at the next page."""

    def page_params(
        self, response: Response, records: list[Any]
    ) -> Sequence[dict[str, Any]] | None:
        """Query parameters of every page (first included), learnt from the first page's
        response, as a lazy sequence (its ``len`` is the page count); None when this
        paginator cannot know them in advance."""
        return None

    def total_records(self, response: Response) -> int | None:
        """The record count ``response`` reports where this paginator reads a total of
        records; None when it reads none."""
        return None

    @property
    def skipped_records(self) -> int:
        """Records before the first page this paginator reads (a starting offset)."""
        return 0

    @abstractmethod
    def _start(self, request: Request) -> None: ...

    @abstractmethod
    def _advance(self, response: Response, records: list[Any]) -> None: ...

    def _options(self) -> dict[str, Any]:
        return {}

    def _body(self, response: Response) -> Any:
        try:
            return response_json(response)
        except ValueError as exc:
            raise SourceError(f"{self}: the response body is not JSON.") from exc

    def __str__(self) -> str:
        options = {**self._options(), "max_pages": self.max_pages}
        shown = ", ".join(f"{k}={v!r}" for k, v in options.items() if v is not None)
        return f"{type(self).__name__}({shown})"

    __repr__ = __str__


class _RangePaginator(BasePaginator):
    """Pages addressed by a number that moves by a fixed step (a page number, an offset).

    Random access when the response reports a total: subclasses turn it into a page count.
    """

    def __init__(
        self, *, first: int, step: int, max_pages: int | None, stop_after_empty_page: bool
    ) -> None:
        super().__init__(max_pages=max_pages, stop_after_empty_page=stop_after_empty_page)
        self.first = first
        self.step = step
        self.current = first

    @abstractmethod
    def _params(self, value: int) -> dict[str, Any]: ...

    @abstractmethod
    def _page_count(self, response: Response) -> int: ...

    def _start(self, request: Request) -> None:
        self.current = self.first
        self.update_request(request)

    def _advance(self, response: Response, records: list[Any]) -> None:
        self.current += self.step
        read = (self.current - self.first) // self.step
        if self.random_access and read >= self._page_count(response):
            self._has_next_page = False

    def update_request(self, request: Request) -> None:
        for name, value in self._params(self.current).items():
            _set_param(request, name, value)

    def page_params(
        self, response: Response, records: list[Any]
    ) -> Sequence[dict[str, Any]] | None:
        if not self.random_access:
            return None
        count = self._page_count(response)
        if self.max_pages is not None:
            # The plan leaves pages out on purpose: the source's total is not to be read.
            self.cut_short = count > self.max_pages
            count = min(count, self.max_pages)
        # Lazy: an API reporting a huge total must not cost a list of every page.
        return LazySequence(range(count), self._params_of_page)

    def _params_of_page(self, index: int) -> dict[str, Any]:
        return self._params(self.first + index * self.step)

    def _read_total(self, response: Response, path: str | None, header: str | None) -> int:
        if path is not None:
            body = self._body(response)
            raw = json_lookup(body, path)
            where = f"total path {path!r}"
            if raw is MISSING:
                raise SourceError(
                    f"{self}: {where} is not in the response, which is {json_kind(body)}. "
                    "Fix: point the total path at the field holding the total, or set it to "
                    "None to read pages until an empty one."
                )
        else:
            assert header is not None
            raw = response.headers.get(header)
            where = f"total header {header!r}"
            if raw is None:
                raise SourceError(
                    f"{self}: the response has no {header!r} header. Fix: set total_header "
                    "to the header the API sends, or None to read pages until an empty one."
                )
        try:
            total = int(raw)
        except (TypeError, ValueError):
            total = -1
        if isinstance(raw, bool) or total < 0:
            raise SourceError(f"{self}: {where} holds {raw!r}, not a non-negative integer.")
        return total


class PageNumberPaginator(_RangePaginator):
    """Pages addressed by number: ``?page=0``, ``?page=1``, ...

    Random access when the API reports the number of pages (``total_pages_path``) or of
    records (``total_records_path`` with ``page_size``).

    Args:
        page_param: query parameter holding the page number.
        base_page: number of the first page (0 or 1 for most APIs).
        page_size: records per page; sent as ``page_size_param`` when that is set.
        page_size_param: query parameter holding the page size (None: not sent).
        total_pages_path: dotted path of the number of pages in the body.
        total_records_path: dotted path of the number of records (needs ``page_size``).
        max_pages: stop after this many pages.
        stop_after_empty_page: stop at the first page without records.

    Examples:
        >>> PageNumberPaginator(base_page=1, total_pages_path="meta.pages")
        PageNumberPaginator(page_param='page', base_page=1, total_pages_path='meta.pages')
    """

    def __init__(
        self,
        *,
        page_param: str = "page",
        base_page: int = 0,
        page_size: int | None = None,
        page_size_param: str | None = None,
        total_pages_path: str | None = None,
        total_records_path: str | None = None,
        max_pages: int | None = None,
        stop_after_empty_page: bool = True,
    ) -> None:
        super().__init__(
            first=require_int(base_page, "base_page", 0),
            step=1,
            max_pages=max_pages,
            stop_after_empty_page=stop_after_empty_page,
        )
        self.page_param = require_name(page_param, "page_param")
        self.page_size = _optional(require_int, page_size, "page_size", 1)
        self.page_size_param = _optional(require_name, page_size_param, "page_size_param")
        if page_size_param is not None and page_size is None:
            raise FlowDefinitionError("page_size_param needs page_size: set both or neither.")
        if total_pages_path is not None and total_records_path is not None:
            raise FlowDefinitionError(
                "Set total_pages_path or total_records_path, not both: the API reports one."
            )
        self.total_pages_path = _optional(require_path, total_pages_path, "total_pages_path")
        self.total_records_path = _optional(require_path, total_records_path, "total_records_path")
        if total_records_path is not None and page_size is None:
            raise FlowDefinitionError(
                "total_records_path needs page_size to turn records into pages: set page_size."
            )
        if not (self.random_access or max_pages or stop_after_empty_page):
            raise FlowDefinitionError(
                "PageNumberPaginator would never stop: set total_pages_path, "
                "total_records_path or max_pages, or keep stop_after_empty_page=True."
            )

    @property
    def random_access(self) -> bool:
        return self.total_pages_path is not None or self.total_records_path is not None

    def _page_count(self, response: Response) -> int:
        if self.total_pages_path is not None:
            return self._read_total(response, self.total_pages_path, None)
        records = self._read_total(response, self.total_records_path, None)
        return math.ceil(records / cast(int, self.page_size))

    def total_records(self, response: Response) -> int | None:
        if self.total_records_path is None:
            return None
        return self._read_total(response, self.total_records_path, None)

    def _params(self, value: int) -> dict[str, Any]:
        params: dict[str, Any] = {self.page_param: value}
        if self.page_size_param is not None:
            params[self.page_size_param] = self.page_size
        return params

    def _options(self) -> dict[str, Any]:
        return {
            "page_param": self.page_param,
            "base_page": self.first,
            "page_size": self.page_size,
            "page_size_param": self.page_size_param,
            "total_pages_path": self.total_pages_path,
            "total_records_path": self.total_records_path,
        }


class OffsetPaginator(_RangePaginator):
    """Pages addressed by record offset: ``?offset=0&limit=100``, ``?offset=100&limit=100``...

    Random access when the API reports the number of records, in the body
    (``total_path``) or in a header (``total_header``, e.g. ``X-Total-Count``).

    Args:
        limit: records per page.
        offset: offset of the first page.
        offset_param: query parameter holding the offset.
        limit_param: query parameter holding the limit (None: not sent).
        total_path: dotted path of the number of records in the body.
        total_header: response header holding the number of records.
        max_pages: stop after this many pages.
        stop_after_empty_page: stop at the first page without records.

    Examples:
        >>> OffsetPaginator(limit=100, total_path="total")
        OffsetPaginator(limit=100, offset_param='offset', limit_param='limit', total_path='total')
    """

    def __init__(
        self,
        *,
        limit: int,
        offset: int = 0,
        offset_param: str = "offset",
        limit_param: str | None = "limit",
        total_path: str | None = None,
        total_header: str | None = None,
        max_pages: int | None = None,
        stop_after_empty_page: bool = True,
    ) -> None:
        super().__init__(
            first=require_int(offset, "offset", 0),
            step=require_int(limit, "limit", 1),
            max_pages=max_pages,
            stop_after_empty_page=stop_after_empty_page,
        )
        self.offset_param = require_name(offset_param, "offset_param")
        self.limit_param = _optional(require_name, limit_param, "limit_param")
        if total_path is not None and total_header is not None:
            raise FlowDefinitionError(
                "Set total_path or total_header, not both: the API reports the total once."
            )
        self.total_path = _optional(require_path, total_path, "total_path")
        self.total_header = _optional(require_name, total_header, "total_header")
        if not (self.random_access or max_pages or stop_after_empty_page):
            raise FlowDefinitionError(
                "OffsetPaginator would never stop: set total_path, total_header or "
                "max_pages, or keep stop_after_empty_page=True."
            )

    @property
    def random_access(self) -> bool:
        return self.total_path is not None or self.total_header is not None

    def _page_count(self, response: Response) -> int:
        total = self._read_total(response, self.total_path, self.total_header)
        return math.ceil(max(0, total - self.first) / self.step)

    def total_records(self, response: Response) -> int | None:
        if not self.random_access:
            return None
        return self._read_total(response, self.total_path, self.total_header)

    @property
    def skipped_records(self) -> int:
        return self.first

    def _params(self, value: int) -> dict[str, Any]:
        params: dict[str, Any] = {self.offset_param: value}
        if self.limit_param is not None:
            params[self.limit_param] = self.step
        return params

    def _options(self) -> dict[str, Any]:
        return {
            "limit": self.step,
            "offset": self.first or None,
            "offset_param": self.offset_param,
            "limit_param": self.limit_param,
            "total_path": self.total_path,
            "total_header": self.total_header,
        }


class JSONCursorPaginator(BasePaginator):
    """The body holds an opaque cursor for the next page, sent back as a query parameter.

    Stops when the cursor is missing, null or empty. A cursor met before in the walk (the
    same one again, or a cycle such as A, B, A) is an error: the walk would never end.

    Args:
        cursor_path: dotted path of the next cursor in the body.
        cursor_param: query parameter that receives the cursor.
        max_pages: stop after this many pages.
        stop_after_empty_page: also stop at the first page without records.

    Examples:
        >>> JSONCursorPaginator(cursor_path="meta.next_cursor", cursor_param="after")
        JSONCursorPaginator(cursor_path='meta.next_cursor', cursor_param='after')
    """

    def __init__(
        self,
        *,
        cursor_path: str = "next_cursor",
        cursor_param: str = "cursor",
        max_pages: int | None = None,
        stop_after_empty_page: bool = False,
    ) -> None:
        super().__init__(max_pages=max_pages, stop_after_empty_page=stop_after_empty_page)
        self.cursor_path = require_path(cursor_path, "cursor_path")
        self.cursor_param = require_name(cursor_param, "cursor_param")
        self.cursor: str | int | None = None
        self._seen: set[bytes] = set()

    def _start(self, request: Request) -> None:
        self.cursor = None
        self._seen = set()
        request.params = {k: v for k, v in _params_of(request).items() if k != self.cursor_param}

    def _advance(self, response: Response, records: list[Any]) -> None:
        value = json_lookup(self._body(response), self.cursor_path)
        if value is MISSING or value is None or value == "":
            self._has_next_page = False
            return
        if isinstance(value, (dict, list, bool, float)):
            raise SourceError(f"{self}: the cursor is {value!r}, not a string or an integer.")
        seen = _fingerprint(value)
        if seen in self._seen:
            again = "the same cursor twice" if value == self.cursor else "a cursor met before"
            raise SourceError(
                f"{self}: the API returned {again} (after {self._pages_seen} pages); "
                "reading on would never end."
            )
        self._seen.add(seen)
        self.cursor = value

    def update_request(self, request: Request) -> None:
        _set_param(request, self.cursor_param, self.cursor)

    def _options(self) -> dict[str, Any]:
        return {"cursor_path": self.cursor_path, "cursor_param": self.cursor_param}


class _NextUrlPaginator(BasePaginator):
    """The response names the URL of the next page; that URL carries all its parameters.

    A next link to a page read before (the page just read, or a cycle) is an error."""

    def __init__(self, *, max_pages: int | None, stop_after_empty_page: bool) -> None:
        super().__init__(max_pages=max_pages, stop_after_empty_page=stop_after_empty_page)
        self.next_url: str | None = None
        self._seen: set[bytes] = set()

    @abstractmethod
    def _find_next(self, response: Response) -> Any: ...

    def _start(self, request: Request) -> None:
        self.next_url = None
        self._seen = set()

    def _advance(self, response: Response, records: list[Any]) -> None:
        found = self._find_next(response)
        if found is MISSING or found is None or found == "":
            self._has_next_page = False
            return
        if not isinstance(found, str):
            raise SourceError(f"{self}: the next link is {found!r}, not a URL.")
        # A relative link is relative to the URL that was requested (RFC 3986 section 5.1).
        url = urljoin(response.url or "", found)
        # The URLs read (after redirects) and the links followed: a cycle meets one of them.
        self._seen.add(_fingerprint(response.url))
        if _fingerprint(url) in self._seen:
            which = "the page just read" if url == response.url else "a page read before"
            raise SourceError(
                f"{self}: the next link points at {which} (after {self._pages_seen} pages); "
                "reading on would never end."
            )
        self._seen.add(_fingerprint(url))
        self.next_url = url

    def update_request(self, request: Request) -> None:
        assert self.next_url is not None, "update_request called without a next page"
        request.url = urljoin(str(request.url or ""), self.next_url)
        # The next URL already holds every query parameter; keeping ours would duplicate them.
        request.params = {}


class JSONLinkPaginator(_NextUrlPaginator):
    """The body holds the URL of the next page (absolute or relative to the request URL).

    Args:
        next_url_path: dotted path of the next URL in the body.
        max_pages: stop after this many pages.
        stop_after_empty_page: also stop at the first page without records.

    Examples:
        >>> JSONLinkPaginator(next_url_path="links.next")
        JSONLinkPaginator(next_url_path='links.next')
    """

    def __init__(
        self,
        *,
        next_url_path: str = "next",
        max_pages: int | None = None,
        stop_after_empty_page: bool = False,
    ) -> None:
        super().__init__(max_pages=max_pages, stop_after_empty_page=stop_after_empty_page)
        self.next_url_path = require_path(next_url_path, "next_url_path")

    def _find_next(self, response: Response) -> Any:
        return json_lookup(self._body(response), self.next_url_path)

    def _options(self) -> dict[str, Any]:
        return {"next_url_path": self.next_url_path}


class HeaderLinkPaginator(_NextUrlPaginator):
    """The RFC 8288 ``Link`` header names the next page (``rel="next"``), as GitHub does.

    Args:
        rel: the link relation of the next page.
        max_pages: stop after this many pages.
        stop_after_empty_page: also stop at the first page without records.

    Examples:
        >>> HeaderLinkPaginator()
        HeaderLinkPaginator(rel='next')
    """

    def __init__(
        self,
        *,
        rel: str = "next",
        max_pages: int | None = None,
        stop_after_empty_page: bool = False,
    ) -> None:
        super().__init__(max_pages=max_pages, stop_after_empty_page=stop_after_empty_page)
        self.rel = require_name(rel, "rel")

    def _find_next(self, response: Response) -> Any:
        # requests parses the header (several links, quoting) into response.links.
        return response.links.get(self.rel, {}).get("url", MISSING)

    def _options(self) -> dict[str, Any]:
        return {"rel": self.rel}
