"""``Ledger``: the SQL ledger of flow runs (flow_metrics & co.), with no Dagster import.

The Dagster resource ``MetricsStore`` holds the same settings and returns one of these;
the RQ worker, the CLI and the bench build one directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Connection, Engine

from resources.counts import Counts
from resources.errors import StoreIntegrityError
from resources.ledger import (
    db,
    flow_key_queries,
    job_queries,
    migrations,
    page_queries,
    partition_queries,
    run_queries,
)
from resources.ledger.job_queries import AckResult, RunGate
from resources.ledger.records import (
    FinalState,
    PageRecord,
    PageTotals,
    RunRow,
    StoredFailure,
    StoredReject,
)
from resources.ledger.schema import FINAL_STATUSES
from resources.run_policy import RunPolicy

DEFAULT_CONNECT_RETRY_SECONDS = 10.0


def _aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None:
        raise ValueError(f"{name}={value.isoformat()} is naive; pass a timezone-aware datetime")
    return value


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _unknown_run(run_id: str) -> ValueError:
    return ValueError(f"run {run_id!r} has no flow_metrics row; call start_run first")


@dataclass(frozen=True)
class Ledger:
    """The durable ledger of flow runs: per-run rows, per-page rows, quarantine, failures.

    PostgreSQL in production, a SQLite file as the embedded default. Every method is one
    transaction and idempotent; only connecting is retried. A failed statement raises
    ``StoreError`` (``StoreUnavailableError`` if the connection was lost), quoting no
    record data. Engines are cached per process, so a ``Ledger`` holds settings only and
    is cheap to make.

    Args:
        url: SQLAlchemy URL; None reads $FLOW_DATABASE_URL, else the SQLite file
            $FLOW_HOME/flow_metrics.db.
        auto_migrate: upgrade the schema to the newest revision on first use.
        connect_retry_seconds: how long to keep retrying a failed connection.

    Examples:
        .. code-block:: python

            from resources.ledger.ledger import Ledger

            ledger = Ledger(url="postgresql+psycopg://flows@db/flows")
            for row in ledger.runs(flow_name="orders_api", limit=5):
                print(row.run_id, row.flow_status)
    """

    url: str | None = None
    auto_migrate: bool = True
    connect_retry_seconds: float = DEFAULT_CONNECT_RETRY_SECONDS

    def __post_init__(self) -> None:
        if self.connect_retry_seconds < 0:
            raise ValueError(f"connect_retry_seconds={self.connect_retry_seconds!r} must be >= 0")

    # --- connection and schema -------------------------------------------------------

    def resolved_url(self) -> str:
        """The URL in use, password included: never log it, use ``redacted_url()``."""
        return db.resolve_url(self.url)

    def redacted_url(self) -> str:
        return db.redacted(self.resolved_url())

    def engine(self) -> Engine:
        """This process's engine (no schema check)."""
        return db.get_engine(self.resolved_url())

    def upgrade(self, revision: str = "head") -> None:
        migrations.migrate(
            self.resolved_url(), revision, downgrade=False, retry_seconds=self.connect_retry_seconds
        )

    def downgrade(self, revision: str) -> None:
        migrations.migrate(
            self.resolved_url(), revision, downgrade=True, retry_seconds=self.connect_retry_seconds
        )

    def current_revision(self) -> str | None:
        engine, retry = self.engine(), self.connect_retry_seconds
        with db.transaction(engine, write=False, retry_seconds=retry) as conn:
            return migrations.current_revision(conn)

    def _tx(self, *, write: bool) -> AbstractContextManager[Connection]:
        url, retry = self.resolved_url(), self.connect_retry_seconds
        migrations.ensure_schema(url, auto_migrate=self.auto_migrate, retry_seconds=retry)
        return db.transaction(db.get_engine(url), write=write, retry_seconds=retry)

    # --- writes ------------------------------------------------------------------------

    def start_run(
        self,
        run_id: str,
        flow_name: str,
        partition_key: str | None,
        started_at: datetime,
        policy: RunPolicy | None = None,
    ) -> None:
        """Insert the run as ``running`` with its flow's policy; calling it again (a retried
        plan op) changes nothing."""
        _aware(started_at, "started_at")
        with self._tx(write=True) as conn:
            policy_json = policy.to_json() if policy is not None else None
            run_queries.insert_run(conn, run_id, flow_name, partition_key, started_at, policy_json)

    def record_plan(self, run_id: str, pages_total: int, reported_total: int | None) -> None:
        """The plan fanned out pages ``0 .. pages_total - 1`` (extraction is done when each
        has a row); ``reported_total``: the record count the source reported, if any."""
        with self._tx(write=True) as conn:
            if run_queries.record_plan(conn, run_id, pages_total, reported_total, _now()) == 0:
                raise _unknown_run(run_id)

    def missing_pages(self, run_id: str) -> list[int] | None:
        """Planned pages without a row in the ledger; None while no plan is recorded."""
        with self._tx(write=False) as conn:
            return page_queries.missing_pages(conn, run_id)

    def heartbeat(self, run_id: str) -> bool:
        """A step of the run is alive (the finalizer's deadline counts from the last one)."""
        with self._tx(write=True) as conn:
            return run_queries.heartbeat(conn, run_id, _now()) == 1

    def note_source_down(self, run_id: str, attempt: str, message: str) -> bool:
        """A step of Dagster run ``attempt`` found the source down (retries spent): the
        attempt's other steps fail fast. A re-execution is a new attempt and tries again."""
        with self._tx(write=True) as conn:
            return run_queries.note_source_down(conn, run_id, attempt, message) == 1

    def source_down(self, run_id: str, attempt: str) -> str | None:
        """The error with which a step of Dagster run ``attempt`` found the source down."""
        with self._tx(write=False) as conn:
            return run_queries.source_down(conn, run_id, attempt)

    def record_pages(self, run_id: str, pages: Sequence[PageRecord]) -> list[PageRecord]:
        """Record page outcomes, replacing any earlier attempt of the same pages; the pages
        as recorded, one per page index, in the order given.

        A page's row, rejects and failures are replaced, never added to, so a retried page
        counts once. Its ``claimed_keys`` are claimed for the run in the same transaction:
        a key another page of the run already owns is taken out of the page and counted
        skipped (Redis, the fast path, may have given it to both after losing the run), so
        hand the handler only the returned pages' keys. One transaction, batched
        statements, no per-record round trips.
        """
        if not pages:
            return []
        try:
            with self._tx(write=True) as conn:
                recorded = page_queries.replace_pages(conn, run_id, pages, _now())
                if recorded is None:
                    raise _unknown_run(run_id)
                return recorded
        except StoreIntegrityError as exc:
            fix = "Call start_run for the run before recording its pages."
            db.raise_unchained(ValueError(f"cannot record pages of run {run_id!r}: {exc}. {fix}"))

    def finish_pages(self, run_id: str, pages: Sequence[PageRecord]) -> None:
        """Record the outcomes of a step's pages, which ``record_pages`` wrote in this attempt
        with the same keys and rejects (counts, status and failures), in one transaction."""
        if not pages:
            return
        with self._tx(write=True) as conn:
            if missing := page_queries.finish_pages(conn, run_id, pages, _now()):
                raise ValueError(
                    f"pages {missing} of run {run_id!r} were not recorded in this attempt;"
                    " call record_pages for them before finish_pages"
                )

    def claim_flow_keys(
        self, flow_name: str, run_id: str, page_index: int, record_keys: Sequence[str]
    ) -> list[bool]:
        """Claim a page's keys for ``dedup="flow"``: one flag per key, True where this run
        owns it (claimed now, or by any page of the run: ``record_pages`` then decides
        between the run's pages).

        A key another run already owns is False: skip it. Exact under concurrent runs of
        the flow; at most two statements, one transaction.
        """
        if not record_keys:
            return []
        with self._tx(write=True) as conn:
            return flow_key_queries.claim_flow_keys(
                conn, flow_name, run_id, page_index, record_keys, _now()
            )

    def record_async_page(
        self, run_id: str, page: PageRecord, job_ids: Mapping[str, str]
    ) -> tuple[PageRecord, set[str]]:
        """Record a page whose jobs go to workers, and its jobs as pending; one transaction.

        The page row is replaced and its keys claimed as in ``record_pages``; only the jobs
        of keys the page owns are registered, and jobs already registered by an earlier
        attempt keep their state. Returns the page as recorded (enqueue only its keys) and
        the keys whose jobs are still pending (the ones a retried page may have to enqueue
        again).
        """
        if page.counts.completed or page.counts.failed:
            raise ValueError(f"page {page.page_index}: outcomes of async jobs come from acks")
        try:
            with self._tx(write=True) as conn:
                recorded = page_queries.replace_pages(conn, run_id, [page], _now())
                if recorded is None:
                    raise _unknown_run(run_id)
                [mine] = recorded
                if len(mine.claimed_keys) < len(page.claimed_keys):
                    owned = set(mine.claimed_keys)
                    job_ids = {key: job for key, job in job_ids.items() if key in owned}
                pending = job_queries.register_jobs(conn, run_id, page.page_index, job_ids, _now())
                return mine, pending
        except StoreIntegrityError as exc:
            what = f"page {page.page_index} of run {run_id!r}"
            db.raise_unchained(ValueError(f"cannot record {what}: {exc}. Call start_run first."))

    def ack_jobs(
        self, flow_name: str, run_id: str, completed: Sequence[str], failed: Mapping[str, str]
    ) -> AckResult:
        """Apply a worker's job outcomes as guarded transitions (``job_queries.ack_jobs``),
        in one transaction. A late success of a ``dedup="flow"`` run claims its key again if
        the finalizer had released it: the record was handled after all."""
        now = _now()
        with self._tx(write=True) as conn:
            result = job_queries.ack_jobs(conn, run_id, completed, failed, now)
            policy = result.gate.policy if result.gate else None
            if result.completed_late and policy is not None and policy.dedup == "flow":
                late = result.completed_late
                flow_key_queries.reclaim_flow_keys(conn, flow_name, run_id, late, now)
        return result

    def mark_extraction_done(self, run_id: str) -> None:
        """Collect's hint that every step ran; the finalizer proves it from the page rows."""
        with self._tx(write=True) as conn:
            if run_queries.mark_extraction_done(conn, run_id, _now()) == 0:
                raise _unknown_run(run_id)

    def finalize_many(self, finals: Sequence[FinalState]) -> list[str]:
        """Write each final state whose run is still ``running``, in one transaction.

        Returns:
            The run ids this call finalized (a run already final, or unknown, is left out).
        """
        for final in finals:
            if final.status not in FINAL_STATUSES:
                raise ValueError(
                    f"run {final.run_id!r}: status {final.status!r} is not final;"
                    f" expected one of {FINAL_STATUSES}"
                )
            _aware(final.finished_at, "finished_at")
        if not finals:
            return []
        with self._tx(write=True) as conn:
            return run_queries.finalize_many(conn, finals)

    def note_counter_mismatch(self, run_id: str, note: str) -> bool:
        """Record on a running run that Redis disagreed with the ledger (first note kept)."""
        with self._tx(write=True) as conn:
            return run_queries.note_counter_mismatch(conn, run_id, note) == 1

    def reopen(self, run_id: str) -> bool:
        """A failed or cancelled run is being re-executed: make it ``running`` again so the
        finalizer classifies the re-execution's outcome. True if the row changed."""
        with self._tx(write=True) as conn:
            return run_queries.reopen(conn, run_id, _now()) == 1

    def awaiting_dagster_runs(self, limit: int) -> list[RunRow]:
        """Runs finalized as stalled while their Dagster run was still in progress."""
        with self._tx(write=False) as conn:
            return run_queries.awaiting_dagster_runs(conn, limit)

    def mark_published(self, rows: Sequence[RunRow], at: datetime) -> list[str]:
        """Mark final runs as reported to Dagster, each only if it is still at the revision
        its row says (it was published as read); the run ids marked."""
        _aware(at, "at")
        if not rows:
            return []
        with self._tx(write=True) as conn:
            revisions = [(row.run_id, row.revision) for row in rows]
            return run_queries.mark_published(conn, revisions, at)

    # --- reads -------------------------------------------------------------------------

    def run_gate(self, run_id: str) -> RunGate | None:
        """The run's status and policy, as a worker checks them before a job; None if unknown."""
        with self._tx(write=False) as conn:
            return job_queries.run_gate(conn, run_id)

    def running_runs(self, limit: int) -> list[RunRow]:
        """Runs still ``running``, least recently updated first."""
        with self._tx(write=False) as conn:
            return run_queries.running_runs(conn, limit)

    def unpublished_runs(self, limit: int) -> list[RunRow]:
        """Final runs not yet reported to Dagster, oldest finish first."""
        with self._tx(write=False) as conn:
            return run_queries.unpublished_runs(conn, limit)

    def page_totals(self, run_ids: Sequence[str]) -> dict[str, PageTotals]:
        """Each run's counts summed over its page rows; a run without pages gets zeros."""
        if not run_ids:
            return {}
        with self._tx(write=False) as conn:
            return page_queries.page_totals(conn, run_ids)

    def claimed_keys(self, run_id: str) -> dict[str, int]:
        """Record key -> index of the page that owns it, as the ledger decided (to rebuild
        Redis)."""
        with self._tx(write=False) as conn:
            return page_queries.claimed_keys(conn, run_id)

    def page_counts(self, run_id: str) -> dict[int, Counts]:
        """Page index -> that page's counts (to rebuild Redis)."""
        with self._tx(write=False) as conn:
            return page_queries.page_counts(conn, run_id)

    def runs(
        self, flow_name: str | None = None, run_id: str | None = None, limit: int = 50
    ) -> list[RunRow]:
        """Runs, newest first, optionally of one flow or one run id."""
        with self._tx(write=False) as conn:
            return run_queries.runs(conn, flow_name, run_id, limit)

    def statuses(self, run_ids: Sequence[str]) -> dict[str, tuple[str, int]]:
        """``(flow_status, revision)`` of each known run id (unknown ids are left out)."""
        if not run_ids:
            return {}
        with self._tx(write=False) as conn:
            return run_queries.statuses(conn, run_ids)

    def rejected_records(self, run_id: str, limit: int = 100) -> list[StoredReject]:
        """A run's quarantined records, by page and position."""
        with self._tx(write=False) as conn:
            return page_queries.rejected_records(conn, run_id, limit)

    def job_failures(self, run_id: str, limit: int = 100) -> list[StoredFailure]:
        """A run's failed jobs, by page and record key."""
        with self._tx(write=False) as conn:
            return page_queries.job_failures(conn, run_id, limit)

    def partition_runs(
        self,
        flow_name: str,
        partition_key: str,
        statuses: Sequence[str] | None = None,
        limit: int = 100,
    ) -> list[tuple[str, str]]:
        """``(run_id, flow_status)`` of the flow's runs of one partition, newest first
        (optionally only those in ``statuses``): the schedule's "run it again?" question."""
        with self._tx(write=False) as conn:
            return partition_queries.partition_runs(conn, flow_name, partition_key, statuses, limit)

    # --- after a run is final: failed keys, late outcomes (issue 10) --------------------

    def late_jobs(self, run_ids: Sequence[str]) -> dict[str, int]:
        """Run id -> jobs whose outcome arrived after the run was final (0 if none): recorded,
        never counted, shown by ``flowctl status --run ID``."""
        if not run_ids:
            return {}
        with self._tx(write=False) as conn:
            return job_queries.late_counts(conn, run_ids)

    def late_outcomes(self, run_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """A run's late job outcomes by page and key: ``record_key``, ``page_index``,
        ``outcome`` (``completed`` or ``failed``), ``error``, ``late_at``."""
        with self._tx(write=False) as conn:
            return job_queries.late_outcomes(conn, run_id, limit)
