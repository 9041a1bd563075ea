"""The one place that decides a flow run's final status. Pure: no Dagster, Redis or SQL."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

from resources.counts import Counts


class RunState(enum.Enum):
    """What Dagster says of the run, reduced to what classification needs."""

    IN_PROGRESS = "in_progress"  # queued, starting, started, cancelling
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    MISSING = "missing"  # the Dagster run record is gone (deleted, other instance)


@dataclass(frozen=True)
class Tolerance:
    """How many failed jobs a flow tolerates: a count (int) or a ratio of dispatched (float).

    Examples:
        >>> Tolerance(0).allows(failed=1, dispatched=10)
        False
        >>> Tolerance(0.1).allows(failed=1, dispatched=10)
        True
    """

    max_failed_jobs: int | float = 0

    def __post_init__(self) -> None:
        value = self.max_failed_jobs
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(
                f"max_failed_jobs={value!r}: use a count (int >= 0) or a ratio (float in [0, 1))"
            )
        if isinstance(value, float) and not 0.0 <= value < 1.0:
            raise ValueError(
                f"max_failed_jobs={value!r}: a ratio must be in [0, 1); use an int for a count"
            )
        if isinstance(value, int) and value < 0:
            raise ValueError(f"max_failed_jobs={value!r}: a count must be >= 0")

    def allows(self, failed: int, dispatched: int) -> bool:
        if isinstance(self.max_failed_jobs, float):
            return failed <= self.max_failed_jobs * dispatched
        return failed <= self.max_failed_jobs


@dataclass(frozen=True)
class RunSnapshot:
    """Everything known about one unfinished flow run at one moment.

    Args:
        counts: totals computed from the page ledger.
        extraction_done: every page of the source was planned and processed.
        run_state: the Dagster run's state.
        last_progress_at: when the ledger last changed for this run (a page write or a
            step's heartbeat).
        extraction_gap: what is missing of the extraction and how to recover, when it is
            not done.
        reported_total: the record count the source said it holds, if it said so.
    """

    counts: Counts
    extraction_done: bool
    run_state: RunState
    last_progress_at: datetime
    extraction_gap: str | None = None
    reported_total: int | None = None


@dataclass(frozen=True)
class Verdict:
    """A final status and why, or ``status=None``: not final yet (``reason`` says why)."""

    status: str | None
    reason: str | None = None

    @property
    def is_final(self) -> bool:
        return self.status is not None


def classify(
    snapshot: RunSnapshot, tolerance: Tolerance, now: datetime, deadline: timedelta
) -> Verdict:
    """Decide the status of a flow run (the rules: docs/accounting.md).

    Order: cancelled run -> cancelled; a run still in progress -> not final; a run that
    ended (failed, or succeeded without finishing extraction) with work that cannot finish,
    or that made no progress past the deadline (still running, or unknown to Dagster) ->
    failed; pending jobs -> not final (failed, reason ``stalled``, past the deadline);
    fewer or more records read than the source reported -> failed; failures over
    tolerance -> failed; skipped, rejected or tolerated failures -> partial_success;
    else completed.
    """
    counts = snapshot.counts
    if snapshot.run_state is RunState.CANCELLED:
        return Verdict("cancelled", _unfinished("run cancelled", counts, snapshot))
    stale = now - snapshot.last_progress_at > deadline
    if snapshot.run_state is RunState.IN_PROGRESS:
        if stale:
            return Verdict(
                "failed", _unfinished("stalled: no progress past the deadline", counts, snapshot)
            )
        return Verdict(None, "Dagster run still in progress")
    if snapshot.run_state is RunState.MISSING:
        # Another Dagster instance may own the run (a CLI run beside `dagster dev`): only
        # a run that also stopped making progress is given up on.
        if stale:
            return Verdict("failed", _unfinished("Dagster run not found", counts, snapshot))
        return Verdict(None, "Dagster run not found in this instance; waiting for the deadline")
    if snapshot.run_state is RunState.FAILED or not snapshot.extraction_done:
        cause = (
            "Dagster run failed"
            if snapshot.run_state is RunState.FAILED
            else "run ended before extraction finished"
        )
        return Verdict("failed", _unfinished(cause, counts, snapshot))
    if counts.pending > 0:
        if stale:
            return Verdict(
                "failed", f"stalled: {counts.pending} jobs lost (none finished by the deadline)"
            )
        return Verdict(None, f"{counts.pending} jobs pending")
    if snapshot.reported_total is not None and snapshot.reported_total != counts.source:
        # Read more or fewer records than the source says it holds: a paginator that
        # stopped early (or ran on) must not pass for a complete read.
        return Verdict(
            "failed",
            f"the source reported {snapshot.reported_total} records but {counts.source} were"
            " read; check the paginator (e.g. its first page's parameters)",
        )
    if not tolerance.allows(counts.failed, counts.dispatched):
        return Verdict(
            "failed",
            f"{counts.failed} of {counts.dispatched} jobs failed"
            f" (max_failed_jobs={tolerance.max_failed_jobs})",
        )
    shortfall = _shortfall(counts)
    if shortfall:
        return Verdict("partial_success", shortfall)
    return Verdict("completed")


def _unfinished(cause: str, counts: Counts, snapshot: RunSnapshot) -> str:
    parts = [cause]
    if not snapshot.extraction_done:
        gap = snapshot.extraction_gap
        parts.append(f"extraction incomplete: {gap}" if gap else "extraction incomplete")
    if counts.pending:
        parts.append(f"{counts.pending} jobs lost")
    return "; ".join(parts)


def _shortfall(counts: Counts) -> str | None:
    parts = [
        f"{n} {label}"
        for n, label in (
            (counts.skipped, "duplicates skipped"),
            (counts.rejected, "records rejected"),
            (counts.failed, "jobs failed (tolerated)"),
        )
        if n
    ]
    return ", ".join(parts) or None
