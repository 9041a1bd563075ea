"""Figures 4 and 6: Redis memory per tracked record, keys left after finalization, peak RSS.

``redis_bytes_per_record`` is the growth of Redis ``used_memory`` over one hot-path run
while it is open (dedup hash, page counts, totals), divided by its records. The run is
then finalized by the real finalizer and the run-scoped keys still in Redis are counted.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import datetime, timezone

import dagster as dg
import psutil

from bench.environment import BenchServers
from bench.hotpath import HotPath, HotPathRun
from flow_assets.sources.base import Page
from resources.live.keys import ALL_RUN_KEYS_PATTERN
from sensors.finalizer import FlowPolicy, finalize_runs


def used_memory(servers: BenchServers) -> int:
    with servers.redis_client() as client:
        return int(client.info("memory")["used_memory"])


def run_keys(servers: BenchServers) -> int:
    """Run-scoped keys of this package in Redis (SCAN, never KEYS)."""
    with servers.redis_client() as client:
        return sum(1 for _ in client.scan_iter(match=ALL_RUN_KEYS_PATTERN, count=1000))


def measured_run(
    servers: BenchServers, hot: HotPath, pages: Sequence[Page]
) -> tuple[HotPathRun, dict[str, float]]:
    """A hot-path run on an empty Redis, its memory, then finalized; figures 4."""
    servers.flush_redis()
    before = used_memory(servers)
    run = hot.run(pages)
    grown = used_memory(servers) - before
    hot.store.record_plan(run.run_id, len(pages), None)
    status = _finalize(hot, run.run_id)
    if status is None:
        raise RuntimeError(f"the finalizer did not finalize hot-path run {run.run_id}")
    return run, {
        "redis_bytes_per_record": grown / run.records,
        "redis_keys_after_finalize": run_keys(servers),
    }


def _finalize(hot: HotPath, run_id: str) -> str | None:
    """Finalize as the sensor does, with the run's Dagster run recorded as SUCCESS."""
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_run(
            dg.DagsterRun(
                job_name=hot.flow.job_name, run_id=run_id, status=dg.DagsterRunStatus.SUCCESS
            )
        )
        report = finalize_runs(
            instance,
            hot.store,
            hot.counters,
            {hot.flow.name: FlowPolicy(tolerance=hot.flow.tolerance)},
            now=datetime.now(timezone.utc),
        )
    return report.finalized.get(run_id)


class RssSampler:
    """Peak resident memory of this process plus all its descendants, sampled in a thread.

    Examples:
        >>> with RssSampler() as sampler:  # doctest: +SKIP
        ...     work()
        >>> sampler.peak_mb  # doctest: +SKIP
    """

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._process = psutil.Process()

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20

    def sample(self) -> int:
        total = 0
        for proc in [self._process, *self._process.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:  # a step process that just exited
                continue
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
