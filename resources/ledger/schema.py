"""The SQL ledger's tables (SQLAlchemy Core), identical on PostgreSQL and SQLite.

Alembic migrations in ``resources/ledger/migrations`` build exactly this schema; a test checks
that ``upgrade head`` and this module agree on both dialects.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

FLOW_STATUSES: tuple[str, ...] = ("running", "completed", "partial_success", "failed", "cancelled")
FINAL_STATUSES: tuple[str, ...] = FLOW_STATUSES[1:]
# The run finished: nothing to re-execute (its schedule skips the partition, its chunks go).
SUCCESSFUL_STATUSES: tuple[str, ...] = ("completed", "partial_success")
PAGE_STATUSES: tuple[str, ...] = ("dispatched", "done")
#: flow_page_progress's count columns, in Counts' field order.
PAGE_COUNT_COLUMNS: tuple[str, ...] = (
    "source_records", "dispatched", "skipped", "rejected", "completed", "failed",
)  # fmt: skip

# Stable constraint and index names on every dialect, so migrations can address them.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Literal predicates (not bound parameters): a partial index is only used by a query whose
# WHERE clause contains the same literal term, on SQLite always and on PostgreSQL once a
# prepared statement switches to a generic plan. Queries import these constants.
RUNNING_PREDICATE = "flow_status = 'running'"
UNPUBLISHED_PREDICATE = "published_at IS NULL AND flow_status <> 'running'"
AWAITING_PREDICATE = "awaiting_dagster"

VERSION_TABLE = "flow_metrics_alembic_version"
"""Alembic's version table; not ``alembic_version``, which Dagster's own storage uses."""

metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _in_list(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{value}'" for value in values)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every dialect.

    SQLite has no time zone type: values are stored as naive UTC text and come back with
    ``tzinfo=UTC``; PostgreSQL's ``timestamptz`` values are converted to UTC on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(
                f"naive datetime {value.isoformat()} given to the ledger; pass a"
                " timezone-aware datetime such as datetime.now(timezone.utc)"
            )
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def _count(name: str) -> Column[int]:
    return Column(name, Integer, nullable=False, server_default=text("0"))


flow_metrics = Table(
    "flow_metrics",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("flow_name", String(64), nullable=False),
    Column("partition_key", String(255), nullable=True),
    Column("flow_status", String(32), nullable=False, server_default=text("'running'")),
    _count("source_record_count"),
    _count("dispatched_jobs"),
    _count("skipped_records"),
    _count("rejected_records"),
    _count("completed_jobs"),
    _count("failed_jobs"),
    Column("pages_total", Integer, nullable=True),
    _count("pages_done"),
    Column("extraction_done", Boolean, nullable=False, server_default=false()),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime, nullable=True),
    Column("total_runtime_ms", BigInteger, nullable=True),
    Column("failure_reason", Text, nullable=True),
    Column("updated_at", UTCDateTime, nullable=False),
    # Added by migration 0003, hence after updated_at in every database.
    Column("counter_mismatch", Text, nullable=True),
    Column("published_at", UTCDateTime, nullable=True),
    # Added by migration 0006.
    Column("run_policy", Text, nullable=True),  # the flow's policy as JSON (RunPolicy)
    Column("awaiting_dagster", Boolean, nullable=False, server_default=false()),
    Column("source_reported_total", BigInteger, nullable=True),
    Column("source_down", Text, nullable=True),
    Column("revision", Integer, nullable=False, server_default=text("0")),
    CheckConstraint(f"flow_status IN ({_in_list(FLOW_STATUSES)})", name="flow_status"),
    # The finalizer's hot queries touch only unfinished or unpublished rows: partial
    # indexes keep them as small as the live work, however long the history grows.
    Index(
        "ix_flow_metrics_running",
        "updated_at",
        "run_id",
        sqlite_where=text(RUNNING_PREDICATE),
        postgresql_where=text(RUNNING_PREDICATE),
    ),
    Index(
        "ix_flow_metrics_unpublished",
        "finished_at",
        "run_id",
        sqlite_where=text(UNPUBLISHED_PREDICATE),
        postgresql_where=text(UNPUBLISHED_PREDICATE),
    ),
    # Runs decided while their Dagster run was still in progress (stalled): re-checked.
    Index(
        "ix_flow_metrics_awaiting_dagster",
        "run_id",
        sqlite_where=text(AWAITING_PREDICATE),
        postgresql_where=text(AWAITING_PREDICATE),
    ),
    Index("ix_flow_metrics_flow_name_started_at", "flow_name", "started_at"),
    Index("ix_flow_metrics_started_at", "started_at"),
)


def _run_id_key() -> Column[str]:
    """The run a row belongs to: first part of its primary key, deleted with the run."""
    return Column(
        "run_id",
        String(64),
        ForeignKey("flow_metrics.run_id", ondelete="CASCADE"),
        primary_key=True,
    )


flow_page_progress = Table(
    "flow_page_progress",
    metadata,
    _run_id_key(),
    Column("page_index", Integer, primary_key=True, autoincrement=False),
    Column("status", String(16), nullable=False),
    _count("source_records"),
    _count("dispatched"),
    _count("skipped"),
    _count("rejected"),
    _count("completed"),
    _count("failed"),
    Column("claimed_keys", Text, nullable=False, server_default=text("'[]'")),
    Column("updated_at", UTCDateTime, nullable=False),
    CheckConstraint(f"status IN ({_in_list(PAGE_STATUSES)})", name="status"),
)

flow_rejected_records = Table(
    "flow_rejected_records",
    metadata,
    _run_id_key(),
    Column("page_index", Integer, primary_key=True, autoincrement=False),
    Column("position", Integer, primary_key=True, autoincrement=False),
    Column("reason", Text, nullable=False),
    Column("raw_record", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

flow_job_failures = Table(
    "flow_job_failures",
    metadata,
    _run_id_key(),
    Column("record_key", Text, primary_key=True),
    Column("page_index", Integer, nullable=False),
    Column("error", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # A retried page deletes its own failures first: (run_id, page_index) finds them.
    Index("ix_flow_job_failures_run_id_page_index", "run_id", "page_index"),
)

flow_run_keys = Table(
    "flow_run_keys",
    metadata,
    # Which page of a run owns each record key, claimed in the pre-write transaction once
    # Redis lost the run (from the first page with dedup="flow"), so a key reaches the
    # handler at most once per run whatever Redis loses (0006; run_key_queries).
    _run_id_key(),
    Column("record_key", Text, primary_key=True),
    Column("page_index", Integer, nullable=False),
)

flow_dispatched_keys = Table(
    "flow_dispatched_keys",
    metadata,
    # dedup="flow": every key any run of the flow dispatched, and which run and page own it.
    # No foreign key to flow_metrics: a key stays dispatched even if its run's row is pruned.
    Column("flow_name", String(64), primary_key=True),
    Column("record_key", Text, primary_key=True),
    Column("run_id", String(64), nullable=False),
    Column("page_index", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

JOB_STATES: tuple[str, ...] = ("pending", "completed", "failed")

flow_async_jobs = Table(
    "flow_async_jobs",
    metadata,
    # dispatch="rq": one row per record dispatched to a worker, its state a guarded
    # transition (pending -> completed | failed, failed -> completed). Page rows keep the
    # counts known at dispatch; run totals add these outcomes (page_queries.page_totals).
    _run_id_key(),
    Column("record_key", Text, primary_key=True),
    Column("page_index", Integer, nullable=False),
    Column("job_id", String(160), nullable=False),
    Column("state", String(16), nullable=False, server_default=text("'pending'")),
    Column("error", Text, nullable=True),
    Column("updated_at", UTCDateTime, nullable=False),
    # An outcome that arrived after the run was final: recorded, not counted (0006).
    Column("late_at", UTCDateTime, nullable=True),
    CheckConstraint(f"state IN ({_in_list(JOB_STATES)})", name="state"),
    # Totals group outcomes by (run, page): an index-only scan on PostgreSQL.
    Index("ix_flow_async_jobs_run_id_page_index_state", "run_id", "page_index", "state"),
)
