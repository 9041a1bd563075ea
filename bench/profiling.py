"""Where the time goes: cProfile of the hot path by phase, and of any run by package.

cProfile (stdlib) rather than pyinstrument or py-spy, which are not installed; its
per-call overhead inflates Python-heavy phases a little, so the shares are indicative
and the timed figures come from unprofiled runs.
"""

from __future__ import annotations

import cProfile
import pstats
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.hotpath import HotPath
from flow_assets.sources.base import Page

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Hot-path phases: label -> (file suffix, function) whose cumulative time it is.
HOT_PATH_PHASES: dict[str, tuple[str, str]] = {
    "validate records (Python, per record)": ("flow_assets/validation.py", "validate_records"),
    "Redis claim_page (Lua dedup)": ("resources/live/counters.py", "claim_page"),
    "SQL page ledger: record_pages (pre-write, keys and rejects)": (
        "resources/ledger/ledger.py",
        "record_pages",
    ),
    "SQL page ledger: finish_pages (counts, failures)": (
        "resources/ledger/ledger.py",
        "finish_pages",
    ),
    "JobBatch build (Python, per record)": ("flow_assets/dispatch.py", "__init__"),
    "JobBatch finish": ("flow_assets/dispatch.py", "finish"),
    "Redis record_pages (Lua counts)": ("resources/live/counters.py", "record_pages"),
}
_TOTAL = ("flow_assets/page_step.py", "process_pages")


@dataclass(frozen=True)
class Share:
    """One line of a breakdown: what, seconds, fraction of the total."""

    label: str
    seconds: float
    share: float


def profile(call: Callable[[], Any]) -> pstats.Stats:
    """Run ``call`` under cProfile."""
    profiler = cProfile.Profile()
    profiler.runcall(call)
    return pstats.Stats(profiler)


def hot_path_profile(hot: HotPath, pages: Sequence[Page]) -> list[Share]:
    """Profile ``process_pages`` over ``pages`` in a fresh run; its time by phase."""
    run_id = hot.open_run()
    return phase_breakdown(profile(lambda: hot.run(pages, run_id)), HOT_PATH_PHASES, _TOTAL)


def phase_breakdown(
    stats: pstats.Stats,
    phases: dict[str, tuple[str, str]],
    total: tuple[str, str],
    other: str = "other (page_step glue, dataclasses)",
) -> list[Share]:
    """Cumulative time of each phase function within ``total``'s; the rest as "other"."""
    entries: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]

    def cumulative(where: tuple[str, str]) -> float:
        suffix, name = where
        return sum(
            v[3] for (file, _, func), v in entries.items() if func == name and file.endswith(suffix)
        )

    whole = cumulative(total)
    shares = [Share(label, cumulative(where), 0.0) for label, where in phases.items()]
    shares.append(Share(other, whole - sum(s.seconds for s in shares), 0.0))
    return [Share(s.label, s.seconds, s.seconds / whole if whole else 0.0) for s in shares]


def package_breakdown(stats: pstats.Stats, top: int = 10) -> list[Share]:
    """Own time (tottime) grouped by the package it was spent in, largest first."""
    entries: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    groups: dict[str, float] = {}
    for (file, _, func), values in entries.items():
        group = _group(file, func)
        groups[group] = groups.get(group, 0.0) + values[2]
    whole = sum(groups.values()) or 1.0
    ranked = sorted(groups.items(), key=lambda item: item[1], reverse=True)
    shares = [Share(label, seconds, seconds / whole) for label, seconds in ranked[:top]]
    rest = sum(seconds for _, seconds in ranked[top:])
    if rest:
        shares.append(Share("everything else", rest, rest / whole))
    return shares


def _group(file: str, func: str) -> str:
    if file == "~":  # C functions: their names say what they wait for
        return f"C: {func.strip('{}<>').removeprefix('built-in method ')}"
    if "site-packages/" in file:
        return file.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    path = Path(file)
    if path.is_relative_to(REPO_ROOT):
        return f"this repo: {path.relative_to(REPO_ROOT).parts[0]}"
    return "python stdlib"
