"""Paginators that follow the API from page to page: a cursor or a next link (read in
order; a cursor or link met before is an error, not a loop)."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any
from urllib.parse import urljoin

from requests import Request, Response

from flow_assets.errors import SourceError
from flow_assets.options import require_name, require_path
from flow_assets.sources.json_body import MISSING, excerpt, json_kind, json_lookup
from flow_assets.sources.paginators.base import (
    BasePaginator,
    fingerprint,
    params_of,
    set_param,
)


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
        request.params = {k: v for k, v in params_of(request).items() if k != self.cursor_param}

    def _advance(self, response: Response, records: list[Any]) -> None:
        value = json_lookup(self._body(response), self.cursor_path)
        if value is MISSING or value is None or value == "":
            self._has_next_page = False
            return
        if isinstance(value, (dict, list, bool, float)):
            raise SourceError(
                f"{self}: the cursor is {json_kind(value)}, not a string or an integer."
            )
        seen = fingerprint(value)
        if seen in self._seen:
            again = "the same cursor twice" if value == self.cursor else "a cursor met before"
            raise SourceError(
                f"{self}: the API returned {again} (after {self._pages_seen} pages); "
                "reading on would never end."
            )
        self._seen.add(seen)
        self.cursor = value

    def update_request(self, request: Request) -> None:
        set_param(request, self.cursor_param, self.cursor)

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
            raise SourceError(f"{self}: the next link is {json_kind(found)}, not a URL.")
        url = self._resolve(response, found)
        # The URLs read (after redirects) and the links followed: a cycle meets one of them.
        self._seen.add(fingerprint(response.url))
        if fingerprint(url) in self._seen:
            which = "the page just read" if url == response.url else "a page read before"
            raise SourceError(
                f"{self}: the next link points at {which} (after {self._pages_seen} pages); "
                "reading on would never end."
            )
        self._seen.add(fingerprint(url))
        self.next_url = url

    def _resolve(self, response: Response, link: str) -> str:
        """The absolute URL of ``link``: relative to the URL requested (RFC 3986, 5.1)."""
        try:
            return urljoin(response.url or "", link)
        except ValueError as exc:  # "http://[::1": urllib cannot parse it, nor requests
            raise SourceError(
                f"{self}: the next link is not a valid URL ({excerpt(str(exc))}). Fix: have "
                "the API send well-formed next links, or use another paginator."
            ) from None

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
