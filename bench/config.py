"""How big each benchmark is (full or ``BENCH_QUICK=1``) and the goal of each figure."""

from __future__ import annotations

import operator
import os
from collections.abc import Callable
from dataclasses import dataclass

QUICK_ENV = "BENCH_QUICK"


@dataclass(frozen=True)
class Sizes:
    """Workload sizes of one benchmark run.

    Args:
        quick: the smaller run (``BENCH_QUICK=1``).
        hot_path_records: records per hot-path run, ascending; the scaling fit uses all,
            the accounting figure the largest.
        baseline_roundtrip_records: records through the per-record Redis baseline.
        baseline_sql_records: jobs through the per-job SQL UPDATE baseline.
        ceiling_ops: INCR commands for the Redis server ceiling.
        e2e_records: records of the large end-to-end run.
        e2e_small_records: records of the small end-to-end run (peak RSS flatness).
        finalizer_runs: runs ready to finalize.
        finalizer_history_rows: older finished rows already in flow_metrics.
        profile_pages: pages profiled with cProfile for the hot-path breakdown.
        repeats: timed runs per hot-path size; the fastest counts (short runs are noisy).
        finalizer_max_ticks: ticks timed at most per finalizer scenario (until every run is
            final and published).
        finalizer_profile_runs: ready runs in the one profiled finalizer tick.
    """

    quick: bool
    hot_path_records: tuple[int, ...]
    baseline_roundtrip_records: int
    baseline_sql_records: int
    ceiling_ops: int
    e2e_records: int
    e2e_small_records: int
    finalizer_runs: int
    finalizer_history_rows: int
    profile_pages: int
    repeats: int
    finalizer_max_ticks: int
    finalizer_profile_runs: int


FULL = Sizes(
    quick=False,
    hot_path_records=(10_000, 100_000, 1_000_000),
    baseline_roundtrip_records=100_000,
    baseline_sql_records=20_000,
    ceiling_ops=2_000_000,
    e2e_records=1_000_000,
    e2e_small_records=100_000,
    finalizer_runs=10_000,
    finalizer_history_rows=1_000_000,
    profile_pages=100,
    repeats=3,
    finalizer_max_ticks=12,
    finalizer_profile_runs=1000,
)

QUICK = Sizes(
    quick=True,
    hot_path_records=(5_000, 20_000, 100_000),
    baseline_roundtrip_records=10_000,
    baseline_sql_records=2_000,
    ceiling_ops=500_000,
    e2e_records=30_000,
    e2e_small_records=10_000,
    finalizer_runs=100,
    finalizer_history_rows=100_000,
    profile_pages=30,
    repeats=3,
    finalizer_max_ticks=4,
    finalizer_profile_runs=20,
)


def sizes_from_env() -> Sizes:
    """QUICK when ``BENCH_QUICK`` is set to anything but ``0``/empty, else FULL."""
    return QUICK if os.environ.get(QUICK_ENV, "") not in ("", "0") else FULL


@dataclass(frozen=True)
class Goal:
    """A figure's target: ``value <op> target``."""

    symbol: str
    target: float

    def met(self, value: float) -> bool:
        return _OPS[self.symbol](value, self.target)

    def __str__(self) -> str:
        return f"{self.symbol} {self.target:,g}"


_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
}


def goals(sizes: Sizes) -> dict[str, Goal]:
    """Goals from issue 5; the finalizer's per-tick goal follows from "within 2 ticks"."""
    return {
        "accounting_records_per_s": Goal(">=", 250_000),
        "accounting_vs_roundtrip_ratio": Goal(">=", 10),
        "accounting_vs_sql_ratio": Goal(">=", 10),
        "e2e_records_per_s_in_process": Goal(">=", 50_000),
        "finalizer_runs_per_tick": Goal(">=", -(-sizes.finalizer_runs // 2)),
        "finalizer_ticks_to_finalize_all": Goal("<=", 2),
        "finalizer_tick_s": Goal("<", 10),
        "finalizer_history_slowdown": Goal("<=", 1.2),
        "redis_bytes_per_record": Goal("<=", 100),
        "redis_keys_after_finalize": Goal("==", 0),
        "scaling_exponent": Goal("<=", 1.05),
        # "Flat in the number of records": 10x the records may cost at most 25 % more.
        "peak_rss_growth_ratio": Goal("<=", 1.25),
        "peak_rss_growth_ratio_multiprocess": Goal("<=", 1.25),
    }
