"""The end-to-end benchmark's flow, importable by Dagster's step processes.

``build_job`` is the reconstructable entry point of the multiprocess run: each step
process calls it with the same keyword arguments. Both entry points install timing
instrumentation in the calling process: every ``process_pages`` call (one per step) and
every page read from the file is timed and appended to ``<timing_dir>/<pid>.tsv``, so the
share of the wall time spent outside our code (Dagster's) can be computed afterwards.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg

import flow_assets.dagster_flow
from bench.data import PAGE_SIZE, no_op
from flow_assets import build
from flow_assets.dagster_names import COUNTERS_KEY, STORE_KEY
from flow_assets.flow import Flow
from flow_assets.page_step import process_pages
from flow_assets.sources.base import Page, PageRef
from flow_assets.sources.files import FileSource
from resources.counts import Counts
from resources.ledger.metrics_store import MetricsStore
from resources.live.redis_counters import RedisCounters

FLOW_NAME = "bench_e2e"
_TIMING_DIR: list[Path] = []  # set once per process by install_timing


def _record(kind: str, seconds: float) -> None:
    if _TIMING_DIR:
        with (_TIMING_DIR[0] / f"{os.getpid()}.tsv").open("a") as out:
            out.write(f"{kind}\t{seconds:.6f}\n")


@contextmanager
def _timed(kind: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        _record(kind, time.perf_counter() - started)


@functools.wraps(process_pages)
def _timed_process_pages(*args: Any, **kwargs: Any) -> Counts:
    with _timed("page"):
        return process_pages(*args, **kwargs)


def install_timing(timing_dir: str) -> None:
    """Time process_pages in this process: the page op looks it up in flow_assets.dagster_flow."""
    _TIMING_DIR[:] = [Path(timing_dir)]
    flow_assets.dagster_flow.process_pages = _timed_process_pages


class TimedFileSource(FileSource):
    """A FileSource whose page reads (file I/O and JSON parsing) are timed: the plan's scan
    for page starts and each page step's fetch (the bench's file is JSON Lines)."""

    def plan(self, partition_key: str | None) -> list[PageRef] | None:
        with _timed("source"):
            return super().plan(partition_key)

    def fetch(self, ref: PageRef) -> Page:
        with _timed("source"):
            return super().fetch(ref)


def build_flow(data_path: str) -> Flow:
    """A 1,000-record-page JSONL flow with the no-op handler and default pages_per_step."""
    return Flow(
        name=FLOW_NAME,
        source=TimedFileSource(data_path, page_size=PAGE_SIZE),
        key="id",
        handler=no_op,
    )


def build_definitions(
    database_url: str, redis_url: str, data_path: str, timing_dir: str
) -> dg.Definitions:
    install_timing(timing_dir)
    resources = {
        STORE_KEY: MetricsStore(url=database_url),
        COUNTERS_KEY: RedisCounters(url=redis_url),
    }
    return build.build_definitions([build_flow(data_path)], resources=resources)


def build_job(
    database_url: str, redis_url: str, data_path: str, timing_dir: str
) -> dg.JobDefinition:
    return build_definitions(database_url, redis_url, data_path, timing_dir).resolve_job_def(
        f"{FLOW_NAME}_job"
    )


def read_timings(timing_dir: str) -> dict[str, float]:
    """Seconds per kind (``page``: our page work, ``source``) over every process."""
    totals = {"page": 0.0, "source": 0.0}
    for path in Path(timing_dir).glob("*.tsv"):
        for line in path.read_text().splitlines():
            kind, seconds = line.split("\t")
            totals[kind] += float(seconds)
    return totals
