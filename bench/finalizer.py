"""Figure 3: the ``finalize_flow_runs`` sensor on many runs ready to finalize, with and
without a long finished history in ``flow_metrics``.

Setup (not timed), per scenario: a fresh Dagster instance on PostgreSQL holding a SUCCESS
``DagsterRun`` record per ready run (``instance.add_run`` from a few threads: the records
the finalizer looks up, without executing thousands of jobs), so that both scenarios
publish into equally empty Dagster storage and differ only in the ledger; a fresh ledger
database with ``history`` older finished and published runs (a ``flow_metrics`` row and a
page row each, inserted server-side from ``generate_series``) plus the ready runs
(``running``, extraction done, one ``done`` page row; COPY), and their live counters in
Redis (``LiveCounters``). An untimed warm-up tick on the instance goes first.

Timed: real sensor ticks, as the daemon evaluates them, until every run is final and
published, at most ``max_ticks`` per scenario (the goal's horizon for finalizing is 2
ticks; publishing to Dagster may take more, within its per-tick budget). When runs are
left after them, the ticks still needed are projected at the first tick's rate (reported
as such).
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import dagster as dg
import psycopg

from bench import data
from bench.environment import BenchServers, psycopg_url
from bench.profiling import Share, phase_breakdown, profile
from flow_assets.build import build_definitions
from flow_assets.dagster_names import COUNTERS_KEY, SENSOR_NAME, STORE_KEY
from resources.counts import Counts
from resources.ledger.ledger import Ledger
from resources.ledger.metrics_store import MetricsStore
from resources.live.counters import LiveCounters
from resources.live.redis_counters import RedisCounters
from sensors.finalizer import DEFAULT_BATCH_SIZE

FLOW = "bench_fin"
PAGE = Counts(source=100, dispatched=100, completed=100)
SEED_THREADS = 8
BATCH = DEFAULT_BATCH_SIZE  # the sensor's default

#: Tick phases: label -> (file suffix, function) whose cumulative time it is.
TICK_PHASES: dict[str, tuple[str, str]] = {
    "ledger: running_runs": ("resources/ledger/ledger.py", "running_runs"),
    "ledger: page_totals": ("resources/ledger/ledger.py", "page_totals"),
    "Dagster: dagster_run_groups (2 get_run_records)": (
        "sensors/publish.py",
        "dagster_run_groups",
    ),
    "Redis: totals_many (pipelined)": ("resources/live/counters.py", "totals_many"),
    "ledger: finalize_many (one transaction)": (
        "resources/ledger/ledger.py",
        "finalize_many",
    ),
    "Dagster: materializations, one event-log batch per flow": (
        "sensors/publish.py",
        "store_materializations",
    ),
    "Dagster: check evaluation per run (report_runless_asset_event)": (
        "dagster/_core/instance/instance.py",
        "report_runless_asset_event",
    ),
    "Dagster: add_run_tags per run": (
        "dagster/_core/instance/methods/run_methods.py",
        "add_run_tags",
    ),
    "Redis: forget_final_runs (pipelined)": ("resources/live/counters.py", "forget_final_runs"),
    "ledger: unpublished_runs": ("resources/ledger/ledger.py", "unpublished_runs"),
    "ledger: mark_published": ("resources/ledger/ledger.py", "mark_published"),
}
_TICK_TOTAL = ("sensors/sensor.py", "finalize_flow_runs")

_HISTORY_SQL = (
    """
INSERT INTO flow_metrics (run_id, flow_name, flow_status, source_record_count, dispatched_jobs,
    skipped_records, rejected_records, completed_jobs, failed_jobs, pages_total, pages_done,
    extraction_done, started_at, finished_at, total_runtime_ms, updated_at, published_at)
SELECT md5('old' || i), %(flow)s, 'completed', 100, 100, 0, 0, 100, 0, 1, 1, true,
    %(now)s - make_interval(secs => 60 + i), %(now)s - make_interval(secs => i),
    60000, %(now)s - make_interval(secs => i), %(now)s - make_interval(secs => i)
FROM generate_series(1, %(rows)s) AS i
""",
    """
INSERT INTO flow_page_progress (run_id, page_index, status, source_records, dispatched,
    skipped, rejected, completed, failed, claimed_keys, updated_at)
SELECT md5('old' || i), 0, 'done', 100, 100, 0, 0, 100, 0, '[]', %(now)s - make_interval(secs => i)
FROM generate_series(1, %(rows)s) AS i
""",
)
_READY_COLUMNS = (
    "run_id, flow_name, flow_status, pages_total, extraction_done, started_at, updated_at"
)
_PAGE_COLUMNS = (
    "run_id, page_index, status, source_records, dispatched, skipped, rejected, completed,"
    " failed, claimed_keys, updated_at"
)


@dataclass
class TickRun:
    """The ticks of one scenario: seconds, runs finalized and runs published per tick."""

    history: int
    runs: int
    seconds: list[float] = field(default_factory=list)
    finalized: list[int] = field(default_factory=list)
    published: list[int] = field(default_factory=list)
    ledger_reads_ms: float = 0.0

    @property
    def ms_per_run(self) -> float:
        """Tick time per run, finalizing and publishing included."""
        return 1000 * sum(self.seconds) / max(sum(self.published), 1)

    @property
    def ticks_to_finalize_all(self) -> float:
        return _ticks_until(self.finalized, self.runs)

    @property
    def ticks_to_publish_all(self) -> float:
        return _ticks_until(self.published, self.runs)


def _ticks_until(per_tick: list[int], runs: int) -> float:
    """Ticks until ``runs`` are done: counted, or projected past the last at the first
    tick's rate."""
    done = 0
    for ticks, count in enumerate(per_tick, start=1):
        done += count
        if done >= runs:
            return ticks
    rate = per_tick[0] if per_tick and per_tick[0] else 0
    if not rate:
        return float("inf")
    return len(per_tick) + -(-(runs - done) // rate)


def new_run_ids(runs: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(runs)]


def add_dagster_runs(instance: dg.DagsterInstance, run_ids: list[str]) -> None:
    """A SUCCESS run record per run id (threads: each add is a few PostgreSQL round trips)."""

    def add(run_id: str) -> None:
        run = dg.DagsterRun(
            job_name=f"{FLOW}_job",
            run_id=run_id,
            status=dg.DagsterRunStatus.SUCCESS,
            tags={"flow/name": FLOW},
        )
        instance.add_run(run)

    with ThreadPoolExecutor(SEED_THREADS) as pool:
        list(pool.map(add, run_ids))


def _seed_ledger(servers: BenchServers, run_ids: list[str], history: int, label: str) -> str:
    url = servers.new_database(f"bench_fin_{label}")
    Ledger(url=url).upgrade()
    now = datetime.now(timezone.utc)
    with psycopg.connect(psycopg_url(url), autocommit=True) as conn:
        if history:
            for statement in _HISTORY_SQL:
                conn.execute(statement, {"flow": FLOW, "now": now, "rows": history})
        started, updated = now - timedelta(minutes=5), now - timedelta(minutes=1)
        with conn.cursor().copy(f"COPY flow_metrics ({_READY_COLUMNS}) FROM STDIN") as copy:
            for run_id in run_ids:
                copy.write_row((run_id, FLOW, "running", 1, True, started, updated))
        with conn.cursor().copy(f"COPY flow_page_progress ({_PAGE_COLUMNS}) FROM STDIN") as copy:
            for run_id in run_ids:
                copy.write_row((run_id, 0, "done", *PAGE.as_tuple(), "[]", updated))
        # A production ledger is analyzed by autovacuum; a fresh bulk load is not yet.
        conn.execute("ANALYZE flow_metrics")
        conn.execute("ANALYZE flow_page_progress")
    servers.flush_redis()
    counters = LiveCounters(url=servers.redis_url)
    for run_id in run_ids:
        counters.start_run(FLOW, run_id)
        counters.record_pages(FLOW, run_id, [(0, PAGE)])
    return url


def _defs(servers: BenchServers, url: str) -> dg.Definitions:
    resources = {
        STORE_KEY: MetricsStore(url=url),
        COUNTERS_KEY: RedisCounters(url=servers.redis_url),
    }
    return build_definitions([data.hot_path_flow(FLOW)], resources=resources)


def _pending(url: str) -> tuple[int, int]:
    """Runs still running, and final runs not yet published."""
    with psycopg.connect(psycopg_url(url)) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE flow_status = 'running'),"
            " count(*) FILTER (WHERE flow_status <> 'running' AND published_at IS NULL)"
            " FROM flow_metrics"
        ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def ledger_reads_ms(url: str, repeats: int = 5) -> float:
    """The ledger reads one tick makes (running runs, their page totals, unpublished runs):
    the only part of a tick that could grow with the finished history. Fastest of
    ``repeats``, in ms; Dagster and Redis are left out, so the figure is steadier."""
    store = Ledger(url=url)
    store.running_runs(1)  # engine, pool and schema check first
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        rows = store.running_runs(BATCH)
        store.page_totals([row.run_id for row in rows])
        store.unpublished_runs(BATCH)
        best = min(best, time.perf_counter() - started)
    return 1000 * best


def _tick(defs: dg.Definitions, instance: dg.DagsterInstance) -> None:
    sensor = defs.resolve_sensor_def(SENSOR_NAME)
    with dg.build_sensor_context(instance=instance, resources=defs.resources) as context:
        sensor(context)


def tick_scenario(
    servers: BenchServers,
    instance: dg.DagsterInstance,
    run_ids: list[str],
    history: int,
    max_ticks: int,
) -> TickRun:
    """Seed a fresh ledger and tick the sensor until every run is final and published,
    or ``max_ticks``."""
    label = f"h{history}"
    url = _seed_ledger(servers, run_ids, history, label)
    defs = _defs(servers, url)
    result = TickRun(history, len(run_ids), ledger_reads_ms=ledger_reads_ms(url))
    running, unpublished = _pending(url)
    while (running or unpublished) and len(result.seconds) < max_ticks:
        started = time.perf_counter()
        _tick(defs, instance)
        result.seconds.append(time.perf_counter() - started)
        still_running, still_unpublished = _pending(url)
        result.finalized.append(running - still_running)
        result.published.append(running + unpublished - still_running - still_unpublished)
        running, unpublished = still_running, still_unpublished
    return result


def warm_up(servers: BenchServers, instance: dg.DagsterInstance, runs: int = 5) -> None:
    """One untimed tick over a few runs, so that Dagster's first-use costs on the instance
    (asset key rows, storage checks) fall on neither timed scenario."""
    run_ids = new_run_ids(runs)
    add_dagster_runs(instance, run_ids)
    tick_scenario(servers, instance, run_ids, 0, 1)


def tick_profile(servers: BenchServers, runs: int) -> list[Share]:
    """One profiled tick over ``runs`` fresh ready runs: its time by phase."""
    run_ids = new_run_ids(runs)
    with servers.dagster_instance("bench_fin_profile") as instance:
        add_dagster_runs(instance, run_ids)
        url = _seed_ledger(servers, run_ids, 0, "profile")
        defs = _defs(servers, url)
        stats = profile(lambda: _tick(defs, instance))
    return phase_breakdown(stats, TICK_PHASES, _TICK_TOTAL, "other (classify, sensor glue)")


def finalizer_figures(with_history: TickRun, without: TickRun) -> dict[str, float]:
    return {
        "finalizer_runs_per_tick": with_history.finalized[0],
        "finalizer_tick_s": max(with_history.seconds),
        "finalizer_ticks_to_finalize_all": with_history.ticks_to_finalize_all,
        "finalizer_ticks_to_publish_all": with_history.ticks_to_publish_all,
        "finalizer_runs_published_first_tick": with_history.published[0],
        "finalizer_ms_per_run": with_history.ms_per_run,
        "finalizer_tick_s_no_history": max(without.seconds),
        "finalizer_ms_per_run_no_history": without.ms_per_run,
        "finalizer_history_slowdown": with_history.ms_per_run / without.ms_per_run,
        "finalizer_ledger_reads_ms": with_history.ledger_reads_ms,
        "finalizer_ledger_reads_ms_no_history": without.ledger_reads_ms,
        "finalizer_ledger_history_slowdown": with_history.ledger_reads_ms / without.ledger_reads_ms,
    }
