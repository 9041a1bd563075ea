"""The benchmark's profile breakdowns name functions by file and name; a function that
moved shows as 0 % instead of failing (it happened when the resources split into core
classes). Every phase must name a function defined in that file."""

from __future__ import annotations

import re
from pathlib import Path

import dagster
import pytest

from bench.finalizer import TICK_PHASES
from bench.profiling import HOT_PATH_PHASES

REPO = Path(__file__).resolve().parents[2]
SITE = Path(dagster.__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("label", "where"), [*HOT_PATH_PHASES.items(), *TICK_PHASES.items()], ids=lambda x: str(x)
)
def test_each_phase_names_a_function_of_its_file(label: str, where: tuple[str, str]) -> None:
    suffix, name = where
    path = (SITE if suffix.startswith("dagster/") else REPO) / suffix
    assert path.is_file(), f"{label}: no file {suffix}"
    assert re.search(rf"^\s*def {name}\(", path.read_text(), re.M), (
        f"{label}: no {name} in {suffix}"
    )
