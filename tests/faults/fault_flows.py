"""Source data, ground truth, a list source and a crash-injecting flow for the page-level
fault tests.

The records carry their source position ``n``, so a handler knows which page it is on.
``build_job`` is the reconstructable entry point of the multiprocess executor: each step
process calls it with the same keyword arguments to rebuild the job, its flow (whose handler
kills its own process once, guarded by a marker file) and its resources.
"""

from __future__ import annotations

import json
import math
import os
import signal
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from flow_assets.dispatch import JobBatch
from flow_assets.flow import Flow
from flow_assets.sources.base import Page, PageRef
from flow_assets.sources.files import FileSource
from resources.counts import Counts
from resources.ledger.ledger import Ledger
from tests.flowkit import make_defs

FLOW_NAME = "fault_orders"
PAGE_SIZE = 50
PAGES_PER_STEP = 4
MAX_FAILED_JOBS = 0.1  # the fail rule below fails ~4 % of the jobs: partial_success


def orders(count: int, page_size: int, quiet_pages: Collection[int] = ()) -> list[dict[str, Any]]:
    """``count`` records: mostly unique ids, some duplicates of earlier ids, some rejects.

    Pages in ``quiet_pages`` hold only unique, valid ids that no other page repeats, so the
    number of jobs they dispatch does not depend on which page claims a key first.
    """
    records: list[dict[str, Any]] = []
    for n in range(count):
        page = n // page_size
        if page not in quiet_pages and n % 29 == 11 and (n - 30) // page_size not in quiet_pages:
            records.append({"n": n, "id": f"o{max(n - 30, 0)}", "amount": -1})
        elif page not in quiet_pages and n % 31 == 5:
            records.append({"n": n, "id": None if n % 2 else 1.5, "amount": n})
        else:
            records.append({"n": n, "id": f"o{n}", "amount": n})
    return records


def key_of(record: Mapping[str, Any]) -> str | None:
    """The record's dedup key as the ground truth sees it: a str id, else None (rejected)."""
    value = record.get("id")
    return value if isinstance(value, str) and value else None


def fails(key: str) -> bool:
    """Whether the downstream system refuses this job (a function of the key only, so a
    duplicate and its original agree)."""
    return int(key[1:]) % 23 == 0


def ground_truth(records: Sequence[Mapping[str, Any]]) -> Counts:
    """The exact counts of a run over ``records``, computed without the package."""
    valid = [key for key in map(key_of, records) if key is not None]
    unique = set(valid)
    failed = sum(1 for key in unique if fails(key))
    return Counts(
        source=len(records),
        dispatched=len(unique),
        skipped=len(valid) - len(unique),
        rejected=len(records) - len(valid),
        completed=len(unique) - failed,
        failed=failed,
    )


def settle(batch: JobBatch, records: Sequence[Mapping[str, Any]]) -> None:
    """Report the outcome of ``records`` (part of ``batch``) by the fail rule."""
    for record in records:
        key = str(record["id"])
        if fails(key):
            batch.fail(record, ValueError(f"order {key} refused downstream"))
        else:
            batch.complete(record)


def page_of(batch: JobBatch, page_size: int) -> int:
    """The index of the page a batch came from (its records carry their position)."""
    return int(batch.records[0]["n"]) // page_size


def write_jsonl(records: Sequence[Mapping[str, Any]], path: Path) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


class ListSource:
    """A random-access source over a list; ``on_fetch(index)`` runs before a page is read
    (in the page step), which is where a fault can strike between two pages."""

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        page_size: int,
        on_fetch: Callable[[int], None] | None = None,
    ) -> None:
        self.records = list(records)
        self.page_size = page_size
        self.on_fetch = on_fetch

    def plan(self, partition_key: str | None) -> list[PageRef]:
        return [PageRef(i) for i in range(math.ceil(len(self.records) / self.page_size))]

    def fetch(self, ref: PageRef) -> Page:
        if self.on_fetch is not None:
            self.on_fetch(ref.index)
        start = ref.index * self.page_size
        return Page(ref.index, self.records[start : start + self.page_size], f"page {ref.index}")

    def pages(self, partition_key: str | None) -> Iterator[Page]:
        return (self.fetch(ref) for ref in self.plan(partition_key))

    def __str__(self) -> str:
        return f"ListSource({len(self.records)} records, page_size={self.page_size})"


def running_run_id(store: Ledger, flow_name: str) -> str:
    """The id of the flow's one run in progress (a handler is not told it)."""
    (row,) = [row for row in store.running_runs(10) if row.flow_name == flow_name]
    return row.run_id


def ledger_totals(store: Ledger, run_id: str) -> Counts:
    return store.page_totals([run_id])[run_id].counts


def crash_once_handler(marker_path: str, crash_page: int) -> Callable[[JobBatch], None]:
    """Settle each page; on ``crash_page``, the first time only, SIGKILL this process after
    settling half of it (the marker file, written first, keeps a re-execution alive)."""
    marker = Path(marker_path)

    def handler(batch: JobBatch) -> None:
        half = len(batch.records) // 2
        settle(batch, batch.records[:half])
        if page_of(batch, PAGE_SIZE) == crash_page and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        settle(batch, batch.records[half:])

    return handler


def build_flow(data_path: str, marker_path: str, crash_page: int) -> Flow:
    return Flow(
        name=FLOW_NAME,
        source=FileSource(data_path, page_size=PAGE_SIZE),
        key="id",
        handler=crash_once_handler(marker_path, crash_page),
        pages_per_step=PAGES_PER_STEP,
        max_failed_jobs=MAX_FAILED_JOBS,
        # No Dagster retry: the crash fails the run, which the test re-executes from failure.
        retry_policy=dg.RetryPolicy(max_retries=0),
    )


def build_definitions(
    database_url: str, redis_url: str, data_path: str, marker_path: str, crash_page: int
) -> dg.Definitions:
    return make_defs([build_flow(data_path, marker_path, crash_page)], redis_url, database_url)


def build_job(
    database_url: str, redis_url: str, data_path: str, marker_path: str, crash_page: int
) -> dg.JobDefinition:
    defs = build_definitions(database_url, redis_url, data_path, marker_path, crash_page)
    return defs.resolve_job_def(f"{FLOW_NAME}_job")
