"""Profiles of the model test (``tests/faults/test_model.py``), read from the environment.

Two tests run the same state machine:

* the fast one: always the same 40 examples of 25 steps on a SQLite ledger (derandomized:
  the same interleavings on every run);
* the deep one: on PostgreSQL, with fresh random seeds: batches of ``batch`` examples, one
  seed, one fresh database and one Dagster instance each, until its time budget (or its
  example cap) is spent. Each seed is printed with the command that replays its batch.

Environment variables (docs/testing.md has the recipes):

``FLOW_MODEL_PROFILE``
    ``default`` (unset): both tests, the deep one for ``FLOW_MODEL_BUDGET_S`` seconds (50).
    ``fast``: the deep test is skipped. ``deep``: a long exploration, 30 minutes by default,
    40 steps per example, failures shrunk.
``FLOW_MODEL_BUDGET_S``
    the deep test's wall-clock budget in seconds (``inf``: no time bound). No new batch
    starts once the time spent plus a batch's mean cost would pass it.
``FLOW_MODEL_EXAMPLES``
    stop the deep test after this many examples in all (whichever of budget and count ends
    first; ``0``: no cap).
``FLOW_MODEL_BATCH``, ``FLOW_MODEL_STEPS``
    examples per seed (25) and steps per example (25; 40 with ``deep``). Replaying a seed
    needs the same two values: the printed replay command carries them.
``FLOW_MODEL_SEED``
    replay: run the one batch of this seed (no budget), exactly as the failing run did, and
    shrink its failure.
``FLOW_MODEL_BLOB``
    replay one failing example alone: the ``b'...'`` of the ``@reproduce_failure(...)``
    line hypothesis printed (with the same ``FLOW_MODEL_STEPS``).
``FLOW_MODEL_LEDGER``
    ``sqlite``: replay a seed (or a blob) on a SQLite ledger instead of PostgreSQL. The same
    examples are drawn: whether the failure is PostgreSQL's alone shows.
``FLOW_MODEL_SHRINK``
    ``1``/``0``: shrink a failing example or not. Off by default in ``make test``
    (shrinking on PostgreSQL can take 5 minutes: the budget would not hold; replaying the
    seed shrinks), on with ``deep`` and in replays.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import pytest

PROFILES = ("default", "fast", "deep")
# make test runs the whole suite in under 15 minutes: the exploration gets 50 s of it.
DEFAULT_BUDGET_S = {"default": 50.0, "deep": 1800.0}
DEFAULT_STEPS = {"default": 25, "deep": 40}
DEFAULT_BATCH = 25
TEST = "tests/faults/test_model.py -k deep"

# Lines the deep test leaves for the end of the session (tests/faults/conftest.py).
MODEL_SUMMARY = pytest.StashKey[list[str]]()


@dataclass(frozen=True)
class DeepRun:
    """How the deep test runs: see the module docstring for each setting."""

    profile: str
    budget_s: float
    batch: int
    steps: int
    max_examples: int  # 0: no cap
    seed: int | None  # replay this seed's batch alone
    blob: str | None  # replay this one example (a reproduce_failure blob)
    shrink: bool  # shrink a failing example (slow on PostgreSQL: up to 5 minutes)
    sqlite: bool  # the ledger on SQLite instead (replays only)

    @property
    def replaying(self) -> bool:
        """One batch replayed (a seed or a blob), not an exploration."""
        return self.seed is not None or self.blob is not None

    def new_seed(self) -> int:
        """The seed of the next batch: the replayed one, else a fresh random one."""
        return self.seed if self.seed is not None else secrets.randbelow(2**32)

    def replay_command(self, seed: int) -> str:
        """The command that runs batch ``seed`` again, exactly (or the blob's example)."""
        if self.blob is not None:
            env = f"FLOW_MODEL_BLOB={self.blob} FLOW_MODEL_STEPS={self.steps}"
        else:
            env = f"FLOW_MODEL_SEED={seed} FLOW_MODEL_BATCH={self.batch} "
            env += f"FLOW_MODEL_STEPS={self.steps}"
        if self.sqlite:
            env += " FLOW_MODEL_LEDGER=sqlite"
        return f"{env} .venv/bin/pytest {TEST}"

    def describe(self) -> str:
        if self.replaying:
            budget = "replay of one " + ("example" if self.blob else f"seed ({self.seed})")
        elif math.isinf(self.budget_s):
            budget = "no time bound"
        else:
            budget = f"budget {self.budget_s:g} s"
        cap = f", at most {self.max_examples} examples" if self.max_examples else ""
        shrink = "" if self.shrink else ", no shrinking"
        ledger = "SQLite" if self.sqlite else "PostgreSQL"
        return (
            f"profile {self.profile}: {budget}{cap}, batches of {self.batch} examples "
            f"x {self.steps} steps on {ledger}{shrink}"
        )


def _number(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name}={raw!r} must be a number >= 0")
    return value


def _count(environ: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    value = _number(environ, name, default)
    if math.isinf(value) or value != int(value) or value < minimum:
        raise ValueError(f"{name}={environ[name]!r} must be a whole number >= {minimum}")
    return int(value)


def profile(environ: Mapping[str, str] = os.environ) -> str:
    name = environ.get("FLOW_MODEL_PROFILE", "").strip().lower() or "default"
    if name not in PROFILES:
        raise ValueError(f"FLOW_MODEL_PROFILE={name!r}: expected one of {', '.join(PROFILES)}")
    return name


def deep_run(environ: Mapping[str, str] = os.environ) -> DeepRun | None:
    """The deep test's settings; None when the profile skips it (``fast``, no replay)."""
    name = profile(environ)
    seed = _count(environ, "FLOW_MODEL_SEED", 0, 0) if environ.get("FLOW_MODEL_SEED") else None
    blob = environ.get("FLOW_MODEL_BLOB", "").strip() or None
    replaying = seed is not None or blob is not None
    if name == "fast" and not replaying:
        return None
    shrink = environ.get("FLOW_MODEL_SHRINK", "").strip()
    if shrink not in ("", "0", "1"):
        raise ValueError(f"FLOW_MODEL_SHRINK={shrink!r}: expected 0 or 1")
    ledger = environ.get("FLOW_MODEL_LEDGER", "").strip().lower() or "postgresql"
    if ledger not in ("postgresql", "sqlite"):
        raise ValueError(f"FLOW_MODEL_LEDGER={ledger!r}: expected postgresql or sqlite")
    if ledger == "sqlite" and not replaying:
        raise ValueError("FLOW_MODEL_LEDGER=sqlite is for replays (FLOW_MODEL_SEED/BLOB)")
    defaults = "deep" if name == "deep" else "default"
    return DeepRun(
        profile=name,
        budget_s=_number(environ, "FLOW_MODEL_BUDGET_S", DEFAULT_BUDGET_S[defaults]),
        batch=_count(environ, "FLOW_MODEL_BATCH", DEFAULT_BATCH, 1),
        steps=_count(environ, "FLOW_MODEL_STEPS", DEFAULT_STEPS[defaults], 1),
        max_examples=_count(environ, "FLOW_MODEL_EXAMPLES", 0, 0),
        seed=seed,
        blob=blob,
        shrink=shrink == "1" if shrink else name == "deep" or replaying,
        sqlite=ledger == "sqlite",
    )
