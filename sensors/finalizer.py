"""Finalize flow runs: read the ledger, ask Dagster how each run ended, classify, write once.

``finalize_runs`` is the whole job of the ``finalize_flow_runs`` sensor, also called by
``flowctl run`` and ``flowctl demo`` so that every path finalizes the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

import dagster as dg

from resources.counts import Counts
from resources.errors import CountersUnavailableError
from resources.metrics_store import FinalState, MetricsStore, PageTotals, RunRow
from resources.redaction import redact_text
from resources.redis_counters import RedisCounters
from sensors.classify import RunSnapshot, RunState, Tolerance, Verdict, classify
from sensors.publish import publish_final_runs

log = logging.getLogger(__name__)

DEFAULT_DEADLINE = timedelta(hours=1)
# Runs examined per pass: the ledger and Redis work is batched (a few ms per 1,000 runs),
# so one tick can finalize a large backfill.
DEFAULT_BATCH_SIZE = 5000
MAX_CAUSE_CHARS = 300
# Every run of a re-execution group carries the group's first run id in this tag (set by
# Dagster's UI, and by the flow's ops for re-executions launched from Python).
ROOT_RUN_ID_TAG = "dagster/root_run_id"

_RUN_STATES = {
    dg.DagsterRunStatus.SUCCESS: RunState.SUCCEEDED,
    dg.DagsterRunStatus.FAILURE: RunState.FAILED,
    dg.DagsterRunStatus.CANCELED: RunState.CANCELLED,
}


@dataclass(frozen=True)
class FlowPolicy:
    """What the finalizer needs to know of a flow: its failure tolerance and deadline."""

    tolerance: Tolerance = field(default_factory=Tolerance)
    deadline: timedelta = DEFAULT_DEADLINE


@dataclass
class FinalizeReport:
    """What one finalization pass did."""

    finalized: dict[str, str] = field(default_factory=dict)  # run_id -> status
    waiting: dict[str, str] = field(default_factory=dict)  # run_id -> why not final
    published: list[str] = field(default_factory=list)
    stray_keys_removed: int = 0

    def summary(self) -> str:
        by_status: dict[str, int] = {}
        for status in self.finalized.values():
            by_status[status] = by_status.get(status, 0) + 1
        done = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())) or "none"
        text = f"finalized: {done}; waiting: {len(self.waiting)}; published: {len(self.published)}"
        if self.stray_keys_removed:
            text += f"; stray runs cleaned: {self.stray_keys_removed}"
        return text


def finalize_runs(
    instance: dg.DagsterInstance,
    store: MetricsStore,
    counters: RedisCounters,
    policies: Mapping[str, FlowPolicy],
    *,
    now: datetime | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    time_budget_seconds: float | None = None,
) -> FinalizeReport:
    """Finalize up to ``batch_size`` unfinished runs, then publish final, unpublished runs.

    The final rows are written in one transaction. Publishing to Dagster (the slow part)
    starts no new chunk of runs once ``time_budget_seconds`` have passed since this call
    began (None: no limit); the rest is published by the next call.

    Safe to run twice or concurrently: the final write is a compare-and-set on
    ``flow_status = 'running'``, so each run gets one final state.
    """
    now = now or datetime.now(timezone.utc)
    started = time.monotonic()
    report = FinalizeReport()
    rows = store.running_runs(batch_size)
    if rows:
        run_ids = [row.run_id for row in rows]
        totals = store.page_totals(run_ids)
        dagster_runs = latest_dagster_runs(instance, run_ids)
        ready: list[tuple[RunRow, PageTotals, Verdict]] = []
        for row in rows:
            page_totals = totals[row.run_id]
            policy = policies.get(row.flow_name, FlowPolicy())
            snapshot = RunSnapshot(
                counts=page_totals.counts,
                extraction_done=row.extraction_done,
                run_state=_run_state(dagster_runs.get(row.run_id)),
                last_progress_at=row.updated_at,
            )
            verdict = classify(snapshot, policy.tolerance, now, policy.deadline)
            if not verdict.is_final:
                report.waiting[row.run_id] = verdict.reason or ""
                continue
            if snapshot.run_state is RunState.FAILED:
                verdict = _with_cause(verdict, instance, dagster_runs[row.run_id])
            ready.append((row, page_totals, verdict))
        finals = _final_states(counters, ready, now)
        statuses = {final.run_id: final.status for final in finals}
        for run_id in store.finalize_many(finals):
            report.finalized[run_id] = statuses[run_id]
    publish_until = None if time_budget_seconds is None else started + time_budget_seconds
    report.published = publish_final_runs(
        instance, store, counters, now, batch_size, until=publish_until
    )
    return report


def latest_dagster_runs(
    instance: dg.DagsterInstance, run_ids: list[str]
) -> dict[str, dg.DagsterRun]:
    """Flow run id -> the newest Dagster run of its re-execution group (or the run itself)."""
    children = instance.get_runs(dg.RunsFilter(tags={ROOT_RUN_ID_TAG: run_ids}))
    roots = instance.get_runs(dg.RunsFilter(run_ids=run_ids))
    latest: dict[str, dg.DagsterRun] = {}
    for run in [*children, *roots]:  # get_runs lists newest first
        latest.setdefault(run.root_run_id or run.run_id, run)
    return latest


def _with_cause(verdict: Verdict, instance: dg.DagsterInstance, run: dg.DagsterRun) -> Verdict:
    """Add the first step failure's error (redacted, one line) to a failed run's reason."""
    failures = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    for record in failures:
        event = record.dagster_event
        error = event.step_failure_data.error if event and event.step_failure_data else None
        if event is not None and error is not None:
            # Dagster wraps the step's exception (and retry requests): show the first error
            # that is not Dagster's own, e.g. our SourceError rather than what it wraps.
            while error.cause is not None and _is_dagster_wrapper(error.cls_name):
                error = error.cause
            text = error.message.strip().splitlines()[0] if error.message.strip() else ""
            if error.cls_name and ": " in text:  # "pkg.mod.Cls: msg" -> "Cls: msg"
                text = f"{error.cls_name}: {text.split(': ', 1)[1]}"
            message = redact_text(text)[:MAX_CAUSE_CHARS]
            return Verdict(verdict.status, f"{verdict.reason}: {event.step_key}: {message}")
    return verdict


def _is_dagster_wrapper(cls_name: str | None) -> bool:
    return cls_name is not None and (
        cls_name.startswith("Dagster") or cls_name == "RetryRequestedFromPolicy"
    )


def _run_state(run: dg.DagsterRun | None) -> RunState:
    if run is None:
        return RunState.MISSING
    return _RUN_STATES.get(run.status, RunState.IN_PROGRESS)


def _final_states(
    counters: RedisCounters, ready: list[tuple[RunRow, PageTotals, Verdict]], now: datetime
) -> list[FinalState]:
    mismatches = _counter_mismatches(counters, [(row, totals.counts) for row, totals, _ in ready])
    finals = []
    for row, totals, verdict in ready:
        mismatch = mismatches[row.run_id]
        if mismatch:
            log.warning("flow %s run %s: %s", row.flow_name, row.run_id, mismatch)
        # A final row has no pending job (DESIGN.md, conservation): jobs that can no longer
        # finish are counted failed, and the reason says how many were lost. The page rows
        # keep them pending, so a re-execution of the run can still finish them.
        counts = totals.counts
        finals.append(
            FinalState(
                row.run_id,
                status=verdict.status or "",
                counts=replace(counts, failed=counts.failed + counts.pending),
                pages_done=totals.pages_done,
                finished_at=now,
                failure_reason=verdict.reason,
                counter_mismatch="; ".join(filter(None, [row.counter_mismatch, mismatch])) or None,
            )
        )
    return finals


def _counter_mismatches(
    counters: RedisCounters, ledgers: list[tuple[RunRow, Counts]]
) -> dict[str, str | None]:
    """Compare Redis's live totals with the ledger's; the ledger wins, the gap is recorded."""
    try:
        live = counters.totals_many([(row.flow_name, row.run_id) for row, _ in ledgers])
    except CountersUnavailableError:
        # Redis is a cache of the ledger: finalizing does not wait for it.
        note = "Redis was unreachable at finalization; totals computed from the SQL ledger"
        return {row.run_id: note for row, _ in ledgers}
    return {
        row.run_id: _mismatch(live[(row.flow_name, row.run_id)], ledger) for row, ledger in ledgers
    }


def _mismatch(live: Counts | None, ledger: Counts) -> str | None:
    if live is None:
        return "Redis had lost the run's counters; totals computed from the SQL ledger"
    if live != ledger:
        return f"Redis counters {live.as_tuple()} differed from the ledger {ledger.as_tuple()}"
    return None
