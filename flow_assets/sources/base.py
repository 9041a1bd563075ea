"""What a source is: something that yields pages of records, deterministically per partition.

Two shapes, chosen by the source:

* random access (``plan`` returns page refs, any iterable of them: a plan of many pages
  may be lazy, see :class:`LazySequence`): page N can be fetched on its own, so the plan op
  fans page refs out and each page step fetches its pages;
* sequential (``plan`` returns None): pages are read in order (cursor, next link, file
  chunks) by the plan op, which fans the pages themselves out.

Either way a page has a stable ``index`` (0-based, in source order) so that a retried or
re-executed step reads - and is accounted as - the same page.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, overload, runtime_checkable

from flow_assets.errors import SourceError


class SourceDownError(SourceError):
    """The source cannot be reached (connection refused, host unreachable) and the
    request's retries are spent: every page of the run would meet the same error, so the
    run's other steps fail at once instead of waiting on it too."""


@dataclass(frozen=True)
class PageRef:
    """Where to fetch one page of a random-access source.

    Args:
        index: the page's 0-based position in the source.
        params: JSON-serialisable request parameters the source needs to fetch it.
        reported_total: the record count the source said it holds, if it said so.
    """

    index: int
    params: Mapping[str, Any] = field(default_factory=dict)
    reported_total: int | None = None


@dataclass(frozen=True)
class Page:
    """One page of raw records, as the source returned them (not yet validated).

    Args:
        index: the page's 0-based position in the source.
        records: the raw records; validation happens in the page step.
        label: where the page came from, for logs and errors (no credentials).
        reported_total: the record count the source said it holds (a total in the body,
            an ``X-Total-Count`` header), if it said so.
    """

    index: int
    records: list[Any]
    label: str = ""
    reported_total: int | None = None


T = TypeVar("T")


class LazySequence(Sequence[T]):
    """``make(i)`` for each ``i`` of ``indexes``, made when asked for: a plan of a billion
    pages costs nothing until it is read (and can be refused by its ``len`` first).

    Examples:
        >>> pages = LazySequence(range(10**9), lambda i: {"page": i})
        >>> len(pages), pages[-1], list(pages[:2])
        (1000000000, {'page': 999999999}, [{'page': 0}, {'page': 1}])
    """

    __slots__ = ("_indexes", "_make")

    def __init__(self, indexes: range, make: Callable[[int], T]) -> None:
        self._indexes = indexes
        self._make = make

    def __len__(self) -> int:
        return len(self._indexes)

    @overload
    def __getitem__(self, item: int) -> T: ...

    @overload
    def __getitem__(self, item: slice) -> LazySequence[T]: ...

    def __getitem__(self, item: int | slice) -> T | LazySequence[T]:
        if isinstance(item, slice):
            return LazySequence(self._indexes[item], self._make)
        return self._make(self._indexes[item])

    def __iter__(self) -> Iterator[T]:
        return map(self._make, self._indexes)

    def __repr__(self) -> str:
        return f"LazySequence({len(self)} items)"


@runtime_checkable
class Source(Protocol):
    """A paginated source of records."""

    def plan(self, partition_key: str | None) -> Iterable[PageRef] | None:
        """Page refs for a random-access source (any iterable: it may be lazy, and is
        iterated once), or None to be read with ``pages``."""
        ...

    def fetch(self, ref: PageRef) -> Page:
        """Fetch one planned page."""
        ...

    def pages(self, partition_key: str | None) -> Iterator[Page]:
        """Read every page in order (sequential sources; random ones may too)."""
        ...


class SequentialSource:
    """Base for sources read in order (files, keyset SQL, cursors): no page refs.

    Subclasses set ``name`` and implement ``pages``.
    """

    name: str

    def plan(self, partition_key: str | None) -> Iterable[PageRef] | None:
        """Always None: the pages are read in order with ``pages``."""
        return None

    def fetch(self, ref: PageRef) -> Page:
        """Not supported: a sequential source has no page refs (``plan`` returns None)."""
        raise SourceError(
            f"Source {self.name!r} is sequential and cannot fetch page {ref.index} on its own. "
            "Fix: read it with pages() (its plan() returns None)."
        )
