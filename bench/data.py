"""Benchmark inputs: deterministic records (1 % duplicates), pages, a JSONL file, a no-op flow.

Record ``i`` is ``{"id": "r<i>", "amount": ..., "region": ...}``; every 100th record
repeats the id of an earlier one, so dedup really skips something (and a run ends as
``partial_success``, not ``completed``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flow_assets.dispatch import JobBatch
from flow_assets.flow import Flow
from flow_assets.sources.base import Page, PageRef

PAGE_SIZE = 1000
DUPLICATE_EVERY = 100
REGIONS = ("eu", "us", "apac")


def record(i: int) -> dict[str, Any]:
    """The ``i``-th record of every benchmark source."""
    dup = i % DUPLICATE_EVERY == DUPLICATE_EVERY - 1
    key = i - 50 if dup else i  # i - 50 is never itself a duplicate: its id was issued
    return {"id": f"r{key:09d}", "amount": i % 997, "region": REGIONS[i % 3]}


def duplicates_in(records: int) -> int:
    """How many of the first ``records`` records repeat an earlier id."""
    return sum(1 for i in range(records) if i % DUPLICATE_EVERY == DUPLICATE_EVERY - 1)


def pages(records: int, page_size: int = PAGE_SIZE) -> list[Page]:
    """The first ``records`` records as pages, built up front (not part of any timing)."""
    return [
        Page(index, [record(i) for i in range(start, min(start + page_size, records))])
        for index, start in enumerate(range(0, records, page_size))
    ]


def write_jsonl(path: Path, records: int) -> Path:
    """Write the first ``records`` records as JSON Lines (once; reused if present)."""
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for start in range(0, records, 10_000):
            stop = min(start + 10_000, records)
            out.write("".join(json.dumps(record(i)) + "\n" for i in range(start, stop)))
    tmp.rename(path)
    return path


def no_op(batch: JobBatch) -> None:
    """The benchmark's handler: every job completes and costs nothing."""


class NoSource:
    """A source that is never read: the hot-path benchmark hands pages in itself."""

    def plan(self, partition_key: str | None) -> list[PageRef] | None:
        return []

    def fetch(self, ref: PageRef) -> Page:
        raise NotImplementedError("the hot-path benchmark passes pages directly")

    def pages(self, partition_key: str | None) -> Iterator[Page]:
        return iter(())

    def __repr__(self) -> str:
        return "NoSource()"


def hot_path_flow(name: str = "bench_hot") -> Flow:
    """A flow with the no-op handler, keyed on ``id``, for the page hot path alone."""
    return Flow(name=name, source=NoSource(), key="id", handler=no_op)
