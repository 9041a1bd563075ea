"""Values the ledger takes and returns: plain frozen dataclasses, no SQL."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import Any

from resources.counts import Counts
from resources.ledger.schema import PAGE_STATUSES
from resources.run_policy import RunPolicy


def _json_value(value: object) -> object:
    return value.isoformat() if isinstance(value, datetime) else value


@dataclass(frozen=True)
class RejectedRecord:
    """A record that failed validation, kept in quarantine with its reason.

    Args:
        position: the record's position within its page (0-based).
        reason: why it was rejected, for a human.
        raw: the record as the source returned it; non-strings are stored as JSON.
    """

    position: int
    reason: str
    raw: object


@dataclass(frozen=True)
class JobFailure:
    """A dispatched job that ended in an error.

    Args:
        record_key: the record's dedup key (unique within a run).
        error: the error text (stored truncated).
    """

    record_key: str
    error: str


@dataclass(frozen=True)
class PageRecord:
    """One page's outcome; recording it again replaces the earlier attempt.

    Args:
        page_index: the page's 0-based index within the run.
        counts: the page's counts; must satisfy conservation.
        status: ``dispatched`` (jobs handed out, outcomes not all known) or ``done``.
        claimed_keys: the record keys this page owns, used to rebuild Redis.
        rejects: the page's quarantined records.
        failures: the page's failed jobs.

    Examples:
        >>> page = PageRecord(0, Counts(source=2, dispatched=2, completed=2), "done", ["a", "b"])
        >>> page.counts.pending
        0
    """

    page_index: int
    counts: Counts
    status: str
    claimed_keys: Sequence[str]
    rejects: Sequence[RejectedRecord] = ()
    failures: Sequence[JobFailure] = ()

    def __post_init__(self) -> None:
        problems = list(self.counts.conservation_errors())
        if self.status not in PAGE_STATUSES:
            problems.append(f"status {self.status!r} is not one of {PAGE_STATUSES}")
        if self.status == "done" and self.counts.pending:
            problems.append(f"status 'done' with {self.counts.pending} jobs still pending")
        if self.page_index < 0:
            problems.append("page_index is negative")
        if problems:
            raise ValueError(f"page {self.page_index} cannot be recorded: {'; '.join(problems)}")

    def without_keys(self, owners: Mapping[str, int]) -> PageRecord:
        """This page without the keys other pages own (key -> owner): they count as skipped.

        The ledger took them from the page before its jobs ran, so the page must have no
        outcome yet; a page left with no job is done.

        Examples:
            >>> page = PageRecord(2, Counts(source=2, dispatched=2), "dispatched", ["a", "b"])
            >>> page.without_keys({"b": 0}).counts
            Counts(source=2, dispatched=1, skipped=1, rejected=0, completed=0, failed=0)
        """
        if self.counts.completed or self.counts.failed:
            taken = ", ".join(f"{key!r} (page {page})" for key, page in sorted(owners.items()))
            raise ValueError(
                f"page {self.page_index} reports outcomes of keys other pages own: {taken};"
                " record a page before its jobs run (status 'dispatched'), then finish it"
            )
        keys = [key for key in self.claimed_keys if key not in owners]
        lost = len(self.claimed_keys) - len(keys)
        counts = replace(
            self.counts,
            dispatched=self.counts.dispatched - lost,
            skipped=self.counts.skipped + lost,
        )
        status = "done" if counts.dispatched == 0 else self.status
        return replace(self, counts=counts, status=status, claimed_keys=keys)


@dataclass(frozen=True)
class PageTotals:
    """A run's totals summed over its page rows (the ledger's view of the run)."""

    counts: Counts
    pages_done: int
    pages_seen: int


@dataclass(frozen=True)
class FinalState:
    """What the finalizer writes on a run it moves out of ``running``.

    Args:
        run_id: the run.
        status: one of the final statuses.
        counts: the run's final counts (no pending job left).
        pages_done: pages whose outcome is known.
        finished_at: when it was finalized (timezone-aware).
        failure_reason: why it did not complete, for a human.
        counter_mismatch: how Redis disagreed with the ledger, if it did.
        runtime_ms: the run's working time (None: from its start to ``finished_at``).
        awaiting_dagster: decided while the Dagster run was still in progress (stalled);
            reopened if that Dagster run succeeds after all.
        ledger_counts: the ledger's totals the state was decided on, when work may still
            land meanwhile (RQ jobs, a step still running): written only if unchanged.
        last_progress_at: the run row's ``updated_at`` the state was decided on: written
            only if unchanged (no page write, heartbeat or ack came in between).
    """

    run_id: str
    status: str
    counts: Counts
    pages_done: int
    finished_at: datetime
    failure_reason: str | None = None
    counter_mismatch: str | None = None
    runtime_ms: int | None = None
    awaiting_dagster: bool = False
    ledger_counts: Counts | None = None
    last_progress_at: datetime | None = None


@dataclass(frozen=True)
class RunRow:
    """One ``flow_metrics`` row; timestamps are timezone-aware UTC."""

    run_id: str
    flow_name: str
    partition_key: str | None
    flow_status: str
    source_record_count: int
    dispatched_jobs: int
    skipped_records: int
    rejected_records: int
    completed_jobs: int
    failed_jobs: int
    pages_total: int | None
    pages_done: int
    extraction_done: bool
    started_at: datetime
    finished_at: datetime | None
    total_runtime_ms: int | None
    failure_reason: str | None
    updated_at: datetime
    counter_mismatch: str | None
    published_at: datetime | None
    run_policy: str | None = None
    awaiting_dagster: bool = False
    source_reported_total: int | None = None
    source_down: str | None = None
    revision: int = 0

    @property
    def policy(self) -> RunPolicy | None:
        """The run's own policy, recorded when it started (None for older rows)."""
        return RunPolicy.from_json(self.run_policy) if self.run_policy else None

    @property
    def counts(self) -> Counts:
        return Counts(
            source=self.source_record_count,
            dispatched=self.dispatched_jobs,
            skipped=self.skipped_records,
            rejected=self.rejected_records,
            completed=self.completed_jobs,
            failed=self.failed_jobs,
        )

    def as_dict(self) -> dict[str, Any]:
        """The row as JSON-friendly values (ISO 8601 timestamps)."""
        return {f.name: _json_value(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class StoredReject:
    """A quarantined record as stored (``raw_record`` possibly truncated)."""

    run_id: str
    page_index: int
    position: int
    reason: str
    raw_record: str
    created_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {f.name: _json_value(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class StoredFailure:
    """A failed job as stored (``error`` possibly truncated)."""

    run_id: str
    record_key: str
    page_index: int
    error: str
    created_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {f.name: _json_value(getattr(self, f.name)) for f in fields(self)}
