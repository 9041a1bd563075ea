"""classify(): pure function, nothing real or faked - no Dagster, Redis or SQL."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resources.counts import Counts
from sensors.classify import RunSnapshot, RunState, Tolerance, classify

NOW = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
DEADLINE = timedelta(minutes=30)
FRESH = NOW - timedelta(minutes=1)
STALE = NOW - timedelta(hours=2)


def snap(
    counts: Counts, state: RunState = RunState.SUCCEEDED, done: bool = True, last: datetime = FRESH
) -> RunSnapshot:
    return RunSnapshot(counts=counts, extraction_done=done, run_state=state, last_progress_at=last)


def verdict(snapshot: RunSnapshot, tolerance: int | float = 0):
    return classify(snapshot, Tolerance(tolerance), NOW, DEADLINE)


def test_all_dispatched_and_completed_is_completed() -> None:
    assert verdict(snap(Counts(10, 10, 0, 0, 10, 0))).status == "completed"


def test_empty_source_is_completed() -> None:
    assert verdict(snap(Counts())).status == "completed"


@pytest.mark.parametrize(
    ("counts", "fragment"),
    [
        (Counts(10, 8, 2, 0, 8, 0), "2 duplicates skipped"),
        (Counts(10, 9, 0, 1, 9, 0), "1 records rejected"),
    ],
)
def test_fewer_jobs_than_source_records_is_partial_success(counts: Counts, fragment: str) -> None:
    result = verdict(snap(counts))
    assert result.status == "partial_success"
    assert fragment in (result.reason or "")


def test_tolerated_failures_are_partial_success_and_excess_fails() -> None:
    counts = Counts(10, 10, 0, 0, 8, 2)
    assert verdict(snap(counts), tolerance=2).status == "partial_success"
    assert verdict(snap(counts), tolerance=0.2).status == "partial_success"
    failed = verdict(snap(counts), tolerance=1)
    assert failed.status == "failed"
    assert "2 of 10 jobs failed" in (failed.reason or "")


def test_cancelled_run_wins_over_everything() -> None:
    result = verdict(snap(Counts(10, 10, 0, 0, 3, 0), RunState.CANCELLED, done=False))
    assert result.status == "cancelled"
    assert "7 jobs lost" in (result.reason or "")


def test_failed_dagster_run_reports_lost_jobs() -> None:
    result = verdict(snap(Counts(10, 10, 0, 0, 4, 0), RunState.FAILED, done=False))
    assert result.status == "failed"
    assert "extraction incomplete" in (result.reason or "")
    assert "6 jobs lost" in (result.reason or "")


def test_success_without_extraction_done_is_failed() -> None:
    assert verdict(snap(Counts(5, 5, 0, 0, 5, 0), done=False)).status == "failed"


def test_pending_jobs_wait_until_the_deadline_then_stall() -> None:
    counts = Counts(10, 10, 0, 0, 7, 0)
    waiting = verdict(snap(counts))
    assert waiting.status is None and "3 jobs pending" in (waiting.reason or "")
    stalled = verdict(snap(counts, last=STALE))
    assert stalled.status == "failed"
    assert (stalled.reason or "").startswith("stalled: 3 jobs lost")


def test_in_progress_run_is_not_final_until_it_stalls() -> None:
    assert verdict(snap(Counts(), RunState.IN_PROGRESS, done=False)).status is None
    stalled = verdict(snap(Counts(), RunState.IN_PROGRESS, done=False, last=STALE))
    assert stalled.status == "failed" and "stalled" in (stalled.reason or "")


def test_run_unknown_to_dagster_waits_for_the_deadline() -> None:
    assert verdict(snap(Counts(), RunState.MISSING, done=False)).status is None
    gone = verdict(snap(Counts(), RunState.MISSING, done=False, last=STALE))
    assert gone.status == "failed" and "not found" in (gone.reason or "")


@pytest.mark.parametrize("bad", [-1, 1.0, 1.5, -0.1, True, "3", None])
def test_invalid_tolerance_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="max_failed_jobs"):
        Tolerance(bad)  # type: ignore[arg-type]


@st.composite
def consistent_counts(draw: st.DrawFn) -> Counts:
    dispatched = draw(st.integers(0, 1000))
    skipped = draw(st.integers(0, 1000))
    rejected = draw(st.integers(0, 1000))
    completed = draw(st.integers(0, dispatched))
    failed = draw(st.integers(0, dispatched - completed))
    return Counts(dispatched + skipped + rejected, dispatched, skipped, rejected, completed, failed)


@given(
    counts=consistent_counts(),
    state=st.sampled_from(RunState),
    done=st.booleans(),
    stale=st.booleans(),
    tolerance=st.one_of(st.integers(0, 50), st.floats(0.0, 0.99)),
)
def test_classify_is_total_and_honest(
    counts: Counts, state: RunState, done: bool, stale: bool, tolerance: int | float
) -> None:
    """Over the whole input space: every verdict is one of the statuses, and each status
    is only given when its definition holds."""
    result = verdict(snap(counts, state, done, STALE if stale else FRESH), tolerance)
    assert result.status in (None, "completed", "partial_success", "failed", "cancelled")
    if result.status is None:
        assert state in (RunState.IN_PROGRESS, RunState.MISSING, RunState.SUCCEEDED)
        assert not stale
        assert result.reason
    if result.status == "cancelled":
        assert state is RunState.CANCELLED
    if state is RunState.CANCELLED:
        assert result.status == "cancelled"
    if result.status == "completed":
        assert state is RunState.SUCCEEDED and done
        assert counts.pending == 0 and counts.failed == 0
        assert counts.dispatched == counts.source
    if result.status == "partial_success":
        assert state is RunState.SUCCEEDED and done and counts.pending == 0
        assert counts.dispatched < counts.source or counts.failed > 0
        assert Tolerance(tolerance).allows(counts.failed, counts.dispatched)
    if result.status == "failed":
        assert result.reason
    if state is RunState.FAILED:
        assert result.status == "failed"


def test_reading_fewer_records_than_the_source_reported_fails_with_both_numbers() -> None:
    """Issue 10 item 7: a source that says it holds 2,500 records, of which 100 were read
    (a paginator that stopped after the first page), never ends completed/partial_success."""
    counts = Counts(100, 87, 13, 0, 87, 0)
    short = RunSnapshot(counts, True, RunState.SUCCEEDED, FRESH, reported_total=2500)
    result = verdict(short)
    assert result.status == "failed"
    assert "reported 2500 records but 100 were read" in (result.reason or "")
    exact = RunSnapshot(counts, True, RunState.SUCCEEDED, FRESH, reported_total=100)
    assert verdict(exact).status == "partial_success"


def test_an_incomplete_extraction_names_the_gap_and_the_recovery() -> None:
    """Issue 10 items 1 and 9d: the reason says which pages are missing, and only then."""
    gap = "pages 16-19 of 20 never ran; re-execute all steps of the run"
    missing = RunSnapshot(Counts(10, 10, 0, 0, 10, 0), False, RunState.SUCCEEDED, FRESH, gap)
    result = verdict(missing)
    assert result.status == "failed"
    assert result.reason == f"run ended before extraction finished; extraction incomplete: {gap}"
    failed = RunSnapshot(Counts(10, 10, 0, 0, 8, 0), True, RunState.FAILED, FRESH)
    assert verdict(failed).reason == "Dagster run failed; 2 jobs lost"
