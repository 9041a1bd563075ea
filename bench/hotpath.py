"""Figure 1 and 5: the page hot path alone (``process_pages``), and how it scales.

Pages are built in memory before the clock starts; the clock covers ``process_pages`` for
every page of a fresh run, ``pages_per_step`` pages a call as the page step makes it
(default 8): validation, the Redis dedup claim (Lua), the page ledger writes on
PostgreSQL, the no-op handler and the Redis page records (Lua).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from bench import data
from bench.environment import BenchServers
from flow_assets.flow import Flow
from flow_assets.page_step import process_pages
from flow_assets.sources.base import Page
from resources.counts import Counts
from resources.ledger.ledger import Ledger
from resources.live.counters import LiveCounters

WARMUP_RECORDS = 5_000


@dataclass(frozen=True)
class HotPathRun:
    """One timed run of the hot path."""

    run_id: str
    records: int
    seconds: float
    totals: Counts

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds


@dataclass
class HotPath:
    """The flow, ledger and counters the hot-path runs share (one database, one Redis)."""

    flow: Flow
    store: Ledger
    counters: LiveCounters

    @classmethod
    def on(cls, servers: BenchServers) -> HotPath:
        store = Ledger(url=servers.new_database("bench_hot"))
        return cls(data.hot_path_flow(), store, LiveCounters(url=servers.redis_url))

    def open_run(self) -> str:
        """Start a run in the ledger and in Redis, as the plan op does (not timed)."""
        run_id = str(uuid.uuid4())
        self.store.start_run(run_id, self.flow.name, None, datetime.now(timezone.utc))
        self.counters.start_run(self.flow.name, run_id)
        return run_id

    def run(self, pages: Sequence[Page], run_id: str | None = None) -> HotPathRun:
        """Time ``process_pages`` over ``pages`` in a fresh run, a step's worth of pages a
        call; check the totals it returns."""
        run_id = run_id or self.open_run()
        step = self.flow.pages_per_step
        started = time.perf_counter()
        totals = Counts()
        for start in range(0, len(pages), step):
            step_pages = pages[start : start + step]
            totals += process_pages(self.flow, run_id, step_pages, self.counters, self.store)
        seconds = time.perf_counter() - started
        records = sum(len(page.records) for page in pages)
        _check(totals, records, run_id)
        return HotPathRun(run_id, records, seconds, totals)

    def warm_up(self) -> None:
        """Engine, pool, schema check and script load happen here, not in a timed run."""
        self.run(data.pages(WARMUP_RECORDS))


def _check(totals: Counts, records: int, run_id: str) -> None:
    # The first `records` records hold this many repeated ids, all to be skipped.
    expected = Counts(
        source=records,
        dispatched=records - data.duplicates_in(records),
        skipped=data.duplicates_in(records),
        completed=records - data.duplicates_in(records),
    )
    if totals != expected:
        raise RuntimeError(
            f"hot path run {run_id} counted {totals}, expected {expected}: the benchmark"
            " measured a broken path; run the test suite before benchmarking"
        )


def scaling_exponent(runs: Sequence[HotPathRun]) -> float:
    """Least-squares slope of log(seconds) against log(records): 1.0 is linear."""
    xs = [math.log(run.records) for run in runs]
    ys = [math.log(run.seconds) for run in runs]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    num = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    den = sum((x - mean_x) ** 2 for x in xs)
    return num / den


def hot_path_figures(runs: Sequence[HotPathRun]) -> dict[str, float]:
    """accounting_records_per_s (largest run), scaling_exponent, and each size's rate."""
    largest = max(runs, key=lambda run: run.records)
    figures = {
        "accounting_records_per_s": largest.records_per_s,
        "accounting_seconds": largest.seconds,
        "scaling_exponent": scaling_exponent(runs),
    }
    for run in runs:
        figures[f"accounting_records_per_s_at_{run.records}"] = run.records_per_s
    return figures
