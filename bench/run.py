"""``python -m bench.run`` (``make bench``): run every benchmark, print and write the results.

``BENCH_QUICK=1`` runs smaller sizes (< 3 min) to check the harness and writes under
``bench/quick/`` (not committed); the full run (< 20 min on an idle 2-core machine) gives the
figures of record in ``bench/results.json`` and ``bench/RESULTS.md``. Figures and goals: issue 5.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

import dagster
from rich.console import Console

from bench import baselines, data, e2e, finalizer, hotpath, memory, profiling
from bench.config import Sizes, goals, sizes_from_env
from bench.environment import (
    BenchServers,
    bench_environment,
    machine_info,
    postgres_version,
    python_version,
    redis_version,
)
from bench.reading import reading
from bench.report import Results, print_table, write_json, write_markdown
from sensors.sensor import DEFAULT_TICK_BUDGET_SECONDS

Section = Callable[[BenchServers, Results], None]


def hot_path(servers: BenchServers, results: Results) -> None:
    """Figures 1 (accounting), 4 (Redis memory, keys left) and 5 (scaling)."""
    sizes = results.sizes
    hot = hotpath.HotPath.on(servers)
    hot.warm_up()
    best: list[hotpath.HotPathRun] = []
    for records in sizes.hot_path_records:
        pages = data.pages(records)
        runs = []
        for attempt in range(sizes.repeats):
            if records == sizes.hot_path_records[-1] and attempt == 0:
                run, figures = memory.measured_run(servers, hot, pages)
                results.figures.update(figures)
            else:
                servers.flush_redis()
                run = hot.run(pages)
            runs.append(run)
        best.append(min(runs, key=lambda run: run.seconds))
    results.figures.update(hotpath.hot_path_figures(best))
    results.profiles["hot_path"] = profiling.hot_path_profile(
        hot, data.pages(sizes.profile_pages * data.PAGE_SIZE)
    )
    results.methods["accounting_records_per_s"] = (
        "process_pages over pre-built pages of 1,000 records, 8 pages a call as a page step makes"
        " it (1 % duplicate ids), no-op handler,"
        " LiveCounters + Ledger on PostgreSQL, a fresh run and an empty Redis per timed"
        f" run; fastest of {sizes.repeats} runs per size; the largest size gives the figure"
    )
    results.methods["redis_bytes_per_record"] = (
        "growth of INFO used_memory over the first run of the largest size, while it is open;"
        " then finalized by finalize_runs and run keys counted with SCAN"
    )


def baseline_section(servers: BenchServers, results: Results) -> None:
    """The baselines and the Redis ceiling of figure 1."""
    sizes = results.sizes
    pages = data.pages(sizes.baseline_roundtrip_records)
    figures = results.figures
    figures["baseline_per_record_roundtrip_records_per_s"] = baselines.per_record_roundtrip(
        servers, pages
    )
    figures["baseline_sql_row_update_records_per_s"] = baselines.sql_row_update(
        servers, sizes.baseline_sql_records
    )
    ceiling, method = baselines.redis_ceiling(servers, sizes.ceiling_ops)
    figures["redis_server_ops_per_s"] = ceiling
    figures["redis_python_pipelined_ops_per_s"] = baselines.python_pipelined_incr(
        servers, min(sizes.ceiling_ops, 200_000)
    )
    results.methods["redis_server_ops_per_s"] = method
    results.methods["baselines"] = (
        "per-record round trip: one Lua call per record (SADD dedup + HINCRBY"
        f" dispatched/skipped + completed), {sizes.baseline_roundtrip_records:,} records;"
        " SQL: one autocommit UPDATE bench_run SET pending = pending - 1 per job on a raw"
        f" psycopg connection, {sizes.baseline_sql_records:,} jobs"
    )


def finalizer_section(servers: BenchServers, results: Results) -> None:
    """Figure 3: sensor ticks over ready runs, without and with finished history."""
    sizes = results.sizes
    ticks = {}
    for history in (0, sizes.finalizer_history_rows):
        run_ids = finalizer.new_run_ids(sizes.finalizer_runs)
        with servers.dagster_instance(f"bench_fin_dagster_h{history}") as instance:
            finalizer.add_dagster_runs(instance, run_ids)
            finalizer.warm_up(servers, instance)
            ticks[history] = finalizer.tick_scenario(
                servers, instance, run_ids, history, sizes.finalizer_max_ticks
            )
    results.figures.update(
        finalizer.finalizer_figures(ticks[sizes.finalizer_history_rows], ticks[0])
    )
    results.profiles["finalizer_tick"] = finalizer.tick_profile(
        servers, sizes.finalizer_profile_runs
    )
    results.methods["finalizer"] = (
        "the finalize_flow_runs sensor as build_definitions makes it (batch"
        f" {finalizer.BATCH:,}, tick budget {DEFAULT_TICK_BUDGET_SECONDS:g} s), a fresh"
        " Dagster instance on PostgreSQL per scenario, ready runs seeded (ledger rows by"
        " COPY, Dagster run records by add_run); ticks timed until every run is final and"
        f" published, at most {sizes.finalizer_max_ticks} per scenario, ticks past them"
        " projected at the first tick's rate; ms per run = all ticks' time / runs published;"
        " slowdown = ms per run with history / without"
    )


def e2e_section(servers: BenchServers, results: Results) -> None:
    """Figures 2 and 6: Dagster runs from launch to finalized row, and their memory."""
    sizes = results.sizes
    runs = {}
    for mode in ("in_process", "multiprocess"):
        runs[mode] = e2e.run_worker(servers, mode, sizes.e2e_records)
        runs[f"{mode}_small"] = e2e.run_worker(servers, mode, sizes.e2e_small_records)
    results.figures.update(e2e.e2e_figures(runs))
    phases, packages = e2e.e2e_profile(servers, sizes.e2e_small_records)
    results.profiles["e2e_in_process"] = phases
    results.profiles["e2e_in_process_packages"] = packages
    results.methods["e2e"] = (
        "FileSource over a JSONL file (1,000-record pages, default pages_per_step), no-op"
        " handler; each run in a fresh process, fresh ledger database, empty Redis. In-process:"
        " flow_assets.cli.runner.run_flow on a local SQLite Dagster instance. Multiprocess:"
        " dagster.execute_job, forkserver, max_concurrent = cores, Dagster instance on"
        " PostgreSQL, then one finalizer tick. Dagster share = 1 - (page reads + process_pages"
        " [/ workers] + finalizer tick) / wall. Peak RSS: the process tree's summed RSS,"
        " sampled every 20 ms"
    )


SECTIONS: list[tuple[str, Section]] = [
    ("hot path, Redis memory, scaling", hot_path),
    ("baselines and Redis ceiling", baseline_section),
    ("finalizer", finalizer_section),
    ("end to end and peak memory", e2e_section),
]


def _derived(results: Results) -> None:
    f = results.figures
    accounting = f.get("accounting_records_per_s")
    if accounting and "baseline_per_record_roundtrip_records_per_s" in f:
        f["accounting_vs_roundtrip_ratio"] = (
            accounting / f["baseline_per_record_roundtrip_records_per_s"]
        )
    if accounting and "baseline_sql_row_update_records_per_s" in f:
        f["accounting_vs_sql_ratio"] = accounting / f["baseline_sql_row_update_records_per_s"]


def run_all(sizes: Sizes, console: Console) -> tuple[Results, list[str]]:
    """Every section against one pair of servers; errors are recorded, not fatal."""
    results = Results(sizes, goals(sizes))
    errors: list[str] = []
    started = time.perf_counter()
    with bench_environment() as servers:
        results.context.update(
            machine=machine_info(),
            python=python_version(),
            redis_version=redis_version(servers),
            postgres_version=postgres_version(servers),
            dagster_version=dagster.__version__,
            timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            quick=sizes.quick,
        )
        for title, section in SECTIONS:
            section_started = time.perf_counter()
            with console.status(f"benchmark: {title}"):
                try:
                    section(servers, results)
                except Exception as exc:  # recorded, reported, and the exit code says so
                    errors.append(f"{title}: {type(exc).__name__}: {exc}")
                    console.print_exception(max_frames=5)
            console.log(f"{title}: {time.perf_counter() - section_started:.0f} s")
    _derived(results)
    results.context["duration_s"] = round(time.perf_counter() - started, 1)
    results.context["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if errors:
        results.methods["errors"] = " | ".join(errors)
    return results, errors


def main() -> int:
    sizes = sizes_from_env()
    console = Console()
    console.log(f"benchmark ({'quick' if sizes.quick else 'full'} run) starting")
    try:
        results, errors = run_all(sizes, console)
    except KeyboardInterrupt:
        console.print("interrupted: servers stopped, no results written")
        return 130
    print_table(results, console)
    for path in (write_json(results), write_markdown(results, reading(results))):
        console.log(f"wrote {path}")
    for error in errors:
        console.print(f"[bold red]failed[/]: {error}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
