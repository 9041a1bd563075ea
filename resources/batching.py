"""Cut work into bounded batches: parameters of one SQL ``IN (...)``, commands of one Redis
pipeline, pages of one Dagster step."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TypeVar

T = TypeVar("T")

# Parameters of one SQL IN (...) list: far below every driver's limit, and plans stay cheap.
IN_LIST_SIZE = 500


def batched(items: Iterable[T], size: int) -> Iterator[tuple[T, ...]]:
    """``items`` in tuples of ``size`` (the last one shorter); ``itertools.batched`` of
    Python 3.12+, for 3.10 and 3.11.

    Examples:
        >>> list(batched("abcde", 2))
        [('a', 'b'), ('c', 'd'), ('e',)]
    """
    iterator = iter(items)
    while group := tuple(islice(iterator, size)):
        yield group
