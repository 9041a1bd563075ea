"""Finalize flow runs: read the ledger, ask Dagster how each run ended, classify, write once.

``finalize_runs`` is the whole job of the ``finalize_flow_runs`` sensor, also called by
``flowctl run`` and ``flowctl demo`` so that every path finalizes the same way.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

import dagster as dg

from resources.counts import Counts
from resources.errors import CountersUnavailableError
from resources.flow_run import FlowRun
from resources.ledger.ledger import Ledger
from resources.ledger.page_ranges import missing_pages_text
from resources.ledger.records import FinalState, PageTotals, RunRow
from resources.live.counters import LiveCounters
from resources.redaction import redact_text
from resources.run_policy import RunPolicy
from sensors.classify import RunSnapshot, RunState, Tolerance, Verdict, classify
from sensors.publish import dagster_run_groups, publish_final_runs, tag_group
from sensors.settle import cancel_queued_jobs

log = logging.getLogger(__name__)

DEFAULT_DEADLINE = timedelta(hours=1)
# Runs examined per pass: the ledger and Redis work is batched (a few ms per 1,000 runs),
# so one tick can finalize a large backfill.
DEFAULT_BATCH_SIZE = 5000
MAX_CAUSE_CHARS = 300

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

    @classmethod
    def of_run(cls, policy: RunPolicy) -> FlowPolicy:
        return cls(Tolerance(policy.max_failed_jobs), policy.deadline)


@dataclass
class FinalizeReport:
    """What one finalization pass did."""

    finalized: dict[str, str] = field(default_factory=dict)  # run_id -> status
    waiting: dict[str, str] = field(default_factory=dict)  # run_id -> why not final
    published: list[RunRow] = field(default_factory=list)
    reopened: list[str] = field(default_factory=list)  # stalled runs whose Dagster run ended
    not_ours: list[str] = field(default_factory=list)  # runs with no policy this finalizer knows
    stray_keys_removed: int = 0

    def summary(self) -> str:
        by_status: dict[str, int] = {}
        for status in self.finalized.values():
            by_status[status] = by_status.get(status, 0) + 1
        done = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())) or "none"
        text = f"finalized: {done}; waiting: {len(self.waiting)}; published: {len(self.published)}"
        if self.reopened:
            text += f"; stalled runs reopened after their Dagster run ended: {len(self.reopened)}"
        if self.not_ours:
            text += (
                f"; left to their own code location: {len(self.not_ours)} runs of flows not"
                " defined here that recorded no policy"
            )
        if self.stray_keys_removed:
            text += f"; stray runs cleaned: {self.stray_keys_removed}"
        return text


def finalize_runs(
    instance: dg.DagsterInstance,
    store: Ledger,
    counters: LiveCounters,
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
    report.reopened = _reopen_awaiting_runs(instance, store, counters, batch_size)
    rows = store.running_runs(batch_size)
    if rows:
        groups = dagster_run_groups(instance, [row.run_id for row in rows])
        ready = _decide(instance, store, rows, groups, policies, now, report)
        finals = _final_states(counters, ready, now)
        statuses = {final.run_id: final.status for final in finals}
        for run_id in store.finalize_many(finals):
            report.finalized[run_id] = statuses[run_id]
        # A run awaiting its Dagster run is decided again when that run ends: its jobs stay.
        settled = [d for d in ready if d.row.run_id in report.finalized]
        cancel_queued_jobs(counters, [d.row for d in settled if not d.awaiting_dagster])
    publish_until = None if time_budget_seconds is None else started + time_budget_seconds
    report.published = publish_final_runs(
        instance, store, counters, now, batch_size, until=publish_until
    )
    return report


@dataclass(frozen=True)
class _Decision:
    row: RunRow
    totals: PageTotals
    verdict: Verdict
    runtime_ms: int
    awaiting_dagster: bool


def _decide(
    instance: dg.DagsterInstance,
    store: Ledger,
    rows: list[RunRow],
    groups: Mapping[str, list[dg.RunRecord]],
    policies: Mapping[str, FlowPolicy],
    now: datetime,
    report: FinalizeReport,
) -> list[_Decision]:
    """Classify each running row with its own policy; the final ones, ready to write."""
    totals = store.page_totals([row.run_id for row in rows])
    ready: list[_Decision] = []
    for row in rows:
        policy = run_policy(row, policies)
        if policy is None:
            report.not_ours.append(row.run_id)
            report.waiting[row.run_id] = (
                f"flow {row.flow_name!r} is not defined in this code location and the run"
                " recorded no policy: its own code location's finalizer decides it"
            )
            continue
        page_totals = totals[row.run_id]
        records = groups.get(row.run_id, [])
        latest = records[0].dagster_run if records else None
        snapshot = RunSnapshot(
            counts=page_totals.counts,
            extraction_done=_extraction_done(row, page_totals),
            run_state=_group_state(records),
            last_progress_at=row.updated_at,
            extraction_gap=_extraction_gap(store, row, page_totals),
            reported_total=row.source_reported_total,
        )
        verdict = classify(snapshot, policy.tolerance, now, policy.deadline)
        if not verdict.is_final:
            report.waiting[row.run_id] = verdict.reason or ""
            continue
        if snapshot.run_state is RunState.FAILED and latest is not None:
            verdict = _with_cause(verdict, instance, latest)
        awaiting = snapshot.run_state is RunState.IN_PROGRESS  # stalled while "running"
        runtime_ms = working_time_ms(row, records)
        ready.append(_Decision(row, page_totals, verdict, runtime_ms, awaiting))
    return ready


def run_policy(row: RunRow, policies: Mapping[str, FlowPolicy]) -> FlowPolicy | None:
    """The policy a run is decided with: its own, recorded when it started; for a row of an
    older release, its flow's policy in this code location; else None (not ours)."""
    if row.policy is not None:
        return FlowPolicy.of_run(row.policy)
    return policies.get(row.flow_name)


def _extraction_done(row: RunRow, totals: PageTotals) -> bool:
    """Proven by the ledger: the plan is recorded and every planned page has its row."""
    return row.pages_total is not None and totals.pages_seen >= row.pages_total


def _extraction_gap(store: Ledger, row: RunRow, totals: PageTotals) -> str | None:
    """What is missing of the extraction, and how to recover (None: nothing is)."""
    if row.pages_total is None:
        return "the plan step never finished (no page plan recorded); re-execute the run"
    if totals.pages_seen >= row.pages_total:
        return None
    missing = store.missing_pages(row.run_id) or []
    return (
        f"{missing_pages_text(missing)} of {row.pages_total} never ran;"
        " re-execute all steps of the run (a re-execution from failure cannot reach them)"
    )


def working_time_ms(row: RunRow, records: list[dg.RunRecord]) -> int:
    """The run's working time: the durations of its Dagster runs (each from start to end),
    summed over a re-execution group, plus the time RQ jobs kept working after the last
    Dagster run ended. Idle time between attempts and the finalizer's wait are left out."""
    spans = [
        (record.start_time, record.end_time)
        for record in records
        if record.start_time is not None and record.end_time is not None
    ]
    if not spans:  # the Dagster runs are elsewhere: from the row's start to its last progress
        return _ms((row.updated_at - row.started_at).total_seconds())
    worked = sum(end - start for start, end in spans)
    last_end = max(end for _, end in spans)
    policy = row.policy
    if policy is not None and policy.dispatch == "rq":
        worked += max(0.0, row.updated_at.timestamp() - last_end)
    return _ms(worked)


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _reopen_awaiting_runs(
    instance: dg.DagsterInstance, store: Ledger, counters: LiveCounters, limit: int
) -> list[str]:
    """Runs finalized as stalled while their Dagster run still worked are decided again once
    that Dagster run has ended, whatever its outcome (its steps may have finished pages
    meanwhile), or once jobs of theirs reported outcomes (their workers ran them; the
    Dagster run may never say it ended): reopened here, classified anew this tick from the
    settled ledger. A run this instance cannot see (another Dagster instance) and with no
    late outcome stays as it is."""
    rows = store.awaiting_dagster_runs(limit)
    if not rows:
        return []
    groups = dagster_run_groups(instance, [row.run_id for row in rows])
    late = store.late_jobs([row.run_id for row in rows])
    ended = (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED)
    reopened = []
    for row in rows:
        state = _group_state(groups.get(row.run_id, []))
        why = f"its Dagster run ended ({state.value})" if state in ended else None
        if why is None and late[row.run_id]:
            why = f"{late[row.run_id]} of its jobs reported outcomes"
        if why is None or not store.reopen(row.run_id):
            continue
        log.warning(
            "flow %s run %s: %s after the run was declared stalled; reopened to decide it again",
            row.flow_name,
            row.run_id,
            why,
        )
        tag_group(instance, groups, row.run_id, "running")  # as a re-execution tags it
        # Its finalization removed its Redis state, which RQ acks still update: restore it
        # (not a loss, no note) rather than have the next ack report it lost.
        with contextlib.suppress(CountersUnavailableError):  # the next ack notes it
            FlowRun(row.flow_name, row.run_id, store, counters).restore_reopened(row.revision)
        reopened.append(row.run_id)
    return reopened


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


def _group_state(records: Sequence[dg.RunRecord]) -> RunState:
    """The state of a re-execution group (newest run first): its newest run's. (Not "in
    progress while any is": an older run stuck STARTED for good would keep the flow run
    from ever being decided.)"""
    return _run_state(records[0].dagster_run if records else None)


def _run_state(run: dg.DagsterRun | None) -> RunState:
    if run is None:
        return RunState.MISSING
    return _RUN_STATES.get(run.status, RunState.IN_PROGRESS)


def _final_states(
    counters: LiveCounters, ready: list[_Decision], now: datetime
) -> list[FinalState]:
    mismatches = _counter_mismatches(counters, [(d.row, d.totals.counts) for d in ready])
    finals = []
    for decision in ready:
        row, totals, verdict = decision.row, decision.totals, decision.verdict
        mismatch = mismatches[row.run_id]
        if mismatch:
            log.warning("flow %s run %s: %s", row.flow_name, row.run_id, mismatch)
        # A final row has no pending job (docs/accounting.md, conservation): jobs that can no longer
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
                failure_reason=_redacted(verdict.reason),
                counter_mismatch=_redacted(
                    "; ".join(filter(None, [row.counter_mismatch, mismatch])) or None
                ),
                runtime_ms=decision.runtime_ms,
                awaiting_dagster=decision.awaiting_dagster,
                # Work may still land while this tick decides: write only if none did.
                ledger_counts=counts if _may_still_move(row, decision) else None,
                last_progress_at=row.updated_at,
            )
        )
    return finals


def _redacted(text: str | None) -> str | None:
    """A ledger text as every outward text is: through ``redact_text``."""
    return redact_text(text) if text else None


def _may_still_move(row: RunRow, decision: _Decision) -> bool:
    """RQ workers ack after the Dagster run ended; a stalled run's steps may still write."""
    policy = row.policy
    return decision.awaiting_dagster or (policy is not None and policy.dispatch == "rq")


def _counter_mismatches(
    counters: LiveCounters, ledgers: list[tuple[RunRow, Counts]]
) -> dict[str, str | None]:
    """Compare Redis's live totals with the ledger's; the ledger wins, the gap is recorded."""
    try:
        live = counters.totals_many([(row.flow_name, row.run_id) for row, _ in ledgers])
    except CountersUnavailableError:
        # Redis is a cache of the ledger: finalizing does not wait for it.
        note = "Redis was unreachable at finalization; totals computed from the SQL ledger"
        return {row.run_id: note for row, _ in ledgers}
    return {
        row.run_id: _mismatch(live[(row.flow_name, row.run_id)], ledger, row)
        for row, ledger in ledgers
    }


def _mismatch(live: Counts | None, ledger: Counts, row: RunRow) -> str | None:
    if live is None:
        if row.revision > 0:
            # A reopened run: its keys were removed by its earlier finalization, not lost.
            return None
        return "Redis had lost the run's counters; totals computed from the SQL ledger"
    if live != ledger:
        return f"Redis counters {live.as_tuple()} differed from the ledger {ledger.as_tuple()}"
    return None
