"""The paginator protocol and what every paginator shares (see the package docstring)."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, cast

from requests import Request, Response

from flow_assets.errors import FlowDefinitionError, SourceError
from flow_assets.options import require_int
from flow_assets.sources.json_body import response_json


def fingerprint(value: Any) -> bytes:
    """A short digest of a cursor or URL: the walk remembers every one it met, so their
    memory is bounded per page whatever the API sends."""
    return hashlib.blake2b(repr(value).encode(), digest_size=16).digest()


def optional(check: Any, value: Any, *args: Any) -> Any:
    return None if value is None else check(value, *args)


def params_of(request: Request) -> dict[str, Any]:
    return dict(cast(Any, request.params) or {})


def set_param(request: Request, name: str, value: Any) -> None:
    request.params = {**params_of(request), name: value}


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
        self.max_pages = optional(require_int, max_pages, "max_pages", 1)
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
        except ValueError:
            raise SourceError(f"{self}: the response body is not JSON.") from None

    def __str__(self) -> str:
        options = {**self._options(), "max_pages": self.max_pages}
        shown = ", ".join(f"{k}={v!r}" for k, v in options.items() if v is not None)
        return f"{type(self).__name__}({shown})"

    __repr__ = __str__
