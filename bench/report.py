"""Write what a benchmark run found: a rich table, ``results.json`` and ``RESULTS.md``."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.config import Goal, Sizes
from bench.profiling import Share

BENCH_DIR = Path(__file__).resolve().parent
COMMAND = ".venv/bin/python -m bench.run   # = make bench; BENCH_QUICK=1 for the quick run"


@dataclass
class Results:
    """Everything one run measured, plus where and how."""

    sizes: Sizes
    goals: dict[str, Goal]
    context: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)
    profiles: dict[str, list[Share]] = field(default_factory=dict)

    def verdict(self, name: str) -> str:
        goal, value = self.goals.get(name), self.figures.get(name)
        if goal is None:
            return ""
        if value is None or not math.isfinite(value):
            return "not measured"
        return "met" if goal.met(value) else "NOT MET"


def fmt(name: str, value: float | None) -> str:
    """A figure as a person reads it: rates with separators, ratios and seconds short."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    if "_per_s" in name:
        return f"{value:,.0f}"
    if name.endswith(("_mb", "_mb_small")) or "_mb_" in name:
        return f"{value:,.1f}"
    if float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:,.3g}" if abs(value) < 10 else f"{value:,.1f}"


def _ordered(results: Results) -> list[str]:
    with_goal = [name for name in results.goals if name in results.figures]
    return with_goal + [name for name in results.figures if name not in results.goals]


def print_table(results: Results, console: Console) -> None:
    table = Table(
        title="dagster-flow-metrics benchmark" + (" (QUICK)" if results.sizes.quick else "")
    )
    for column in ("figure", "value", "goal", "status"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for name in _ordered(results):
        goal = results.goals.get(name)
        verdict = results.verdict(name)
        style = {"met": "green", "NOT MET": "bold red"}.get(verdict, "")
        table.add_row(name, fmt(name, results.figures[name]), str(goal or ""), verdict, style=style)
    console.print(table)


def output_dir(sizes: Sizes) -> Path:
    """``bench/`` for the figures of record; a quick run writes ``bench/quick/`` (not
    committed) so it never overwrites them."""
    directory = BENCH_DIR / "quick" if sizes.quick else BENCH_DIR
    directory.mkdir(exist_ok=True)
    return directory


def write_json(results: Results) -> Path:
    """One object: figure name -> number, plus the context keys."""
    path = output_dir(results.sizes) / "results.json"
    figures = {k: (v if math.isfinite(v) else None) for k, v in results.figures.items()}
    payload = {
        **figures,
        **results.context,
        "sizes": asdict(results.sizes),
        "methods": results.methods,
    }
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def _profile_table(shares: list[Share]) -> list[str]:
    lines = ["| where | seconds | share |", "|---|---:|---:|"]
    lines += [f"| {s.label} | {s.seconds:.2f} | {s.share:.0%} |" for s in shares]
    return lines


def write_markdown(results: Results, reading: list[str]) -> Path:
    ctx, sizes = results.context, results.sizes
    path = output_dir(sizes) / "RESULTS.md"
    kind = (
        "QUICK run (BENCH_QUICK=1): reduced sizes, not the figures of record"
        if sizes.quick
        else "full run"
    )
    lines = [
        "# Benchmark results",
        "",
        f"{kind}; {ctx.get('timestamp', '')}; took {ctx.get('duration_s', 0):.0f} s.",
        "",
        "## Figures against their goals",
        "",
        "| figure | value | goal | status |",
        "|---|---:|---|---|",
    ]
    for name in _ordered(results):
        goal = results.goals.get(name)
        verdict = results.verdict(name)
        shown = f"**{verdict}**" if verdict == "NOT MET" else verdict
        lines.append(f"| `{name}` | {fmt(name, results.figures[name])} | {goal or ''} | {shown} |")
    lines += ["", "## Reading", "", *[f"- {line}" for line in reading], ""]
    titles = {
        "hot_path": "Hot path (`process_pages`), by phase (cProfile, cumulative time)",
        "finalizer_tick": "One finalizer tick, by phase (cProfile, cumulative time)",
        "e2e_in_process": (
            "In-process e2e run: execute_in_process by phase (cProfile, cumulative time;"
            " the finalizer tick after it is profiled above)"
        ),
        "e2e_in_process_packages": "In-process e2e run, own time by package (cProfile)",
    }
    lines += ["## Where the time goes", ""]
    for key, shares in results.profiles.items():
        lines += [f"### {titles.get(key, key)}", "", *_profile_table(shares), ""]
    machine = ctx.get("machine", {})
    lines += [
        "## Machine and versions",
        "",
        f"- machine: {machine.get('cpu_model')}, {machine.get('cores')} cores,"
        f" {machine.get('memory_gb')} GB; `{machine.get('uname')}`",
        f"- load average at start: {machine.get('load_average_at_start')},"
        f" at end: {ctx.get('load_average_at_end')}",
        f"- Python {ctx.get('python')}, Redis {ctx.get('redis_version')},"
        f" PostgreSQL {ctx.get('postgres_version')}, Dagster {ctx.get('dagster_version')}",
        "",
        "## Command",
        "",
        "```",
        ("BENCH_QUICK=1 " if sizes.quick else "") + ".venv/bin/python -m bench.run",
        "```",
        "",
        "## How the figures were measured",
        "",
        *[f"- **{name}**: {text}" for name, text in results.methods.items()],
        "",
        "Sizes: " + ", ".join(f"{k}={v}" for k, v in asdict(sizes).items()) + ".",
        "",
        *HOW_TO_RUN,
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


HOW_TO_RUN = [
    "## How to run",
    "",
    "```",
    "make bench                  # full run, < 20 min: the figures of record",
    "BENCH_QUICK=1 make bench    # smaller sizes, < 3 min: checks the harness (bench/quick/)",
    "```",
    "",
    "The harness (`bench/run.py`) starts its own Redis and PostgreSQL with `devservers/`"
    " in a temp dir (PostgreSQL needs its binaries, as for `make test`) and stops them at the"
    " end, also on errors and Ctrl-C. It prints the table and rewrites `results.json`"
    " (figure -> number, plus machine, versions, timestamp, sizes) and this file, in `bench/`"
    " (`bench/quick/` for a quick run, so it never overwrites the figures of record). Run it on"
    " an otherwise idle machine: round-trip-bound figures (the baselines, the finalizer)"
    " suffer most from a busy CPU. Modules: `environment` (servers, machine), `data`"
    " (records, pages, JSONL), `hotpath` + `memory` + `baselines` (figures 1, 4, 5),"
    " `finalizer` (figure 3), `e2e` + `e2e_worker` + `e2e_flow` (figures 2, 6),"
    " `profiling`, `report`, `reading`.",
]
