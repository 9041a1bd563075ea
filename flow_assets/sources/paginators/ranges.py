"""Paginators that address pages by number or offset: random access once a total is known."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, cast

from requests import Request, Response

from flow_assets.errors import FlowDefinitionError, SourceError
from flow_assets.options import require_int, require_name, require_path
from flow_assets.sources.base import LazySequence
from flow_assets.sources.json_body import (
    MAX_COUNT,
    MISSING,
    as_count,
    json_kind,
    json_lookup,
    shown,
)
from flow_assets.sources.paginators.base import (
    BasePaginator,
    optional,
    set_param,
)


def _ceil_div(count: int, size: int) -> int:
    """Pages of ``size`` for ``count`` items, in integers (a float overflows past 1e308)."""
    return -(-count // size)


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
            set_param(request, name, value)

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
        total = as_count(raw)
        if total is None:
            raise SourceError(
                f"{self}: {where} holds {shown(raw)}, not a non-negative integer (up to "
                f"{MAX_COUNT}). Fix: point it at the count the API sends, or set it to None "
                "to read pages until an empty one."
            )
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
        self.page_size = optional(require_int, page_size, "page_size", 1)
        self.page_size_param = optional(require_name, page_size_param, "page_size_param")
        if page_size_param is not None and page_size is None:
            raise FlowDefinitionError("page_size_param needs page_size: set both or neither.")
        if total_pages_path is not None and total_records_path is not None:
            raise FlowDefinitionError(
                "Set total_pages_path or total_records_path, not both: the API reports one."
            )
        self.total_pages_path = optional(require_path, total_pages_path, "total_pages_path")
        self.total_records_path = optional(require_path, total_records_path, "total_records_path")
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
        return _ceil_div(records, cast(int, self.page_size))

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
        self.limit_param = optional(require_name, limit_param, "limit_param")
        if total_path is not None and total_header is not None:
            raise FlowDefinitionError(
                "Set total_path or total_header, not both: the API reports the total once."
            )
        self.total_path = optional(require_path, total_path, "total_path")
        self.total_header = optional(require_name, total_header, "total_header")
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
        return _ceil_div(max(0, total - self.first), self.step)

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
