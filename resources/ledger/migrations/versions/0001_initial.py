"""Initial ledger: flow_metrics and flow_page_progress.

Revision ID: 0001
Revises:
Create Date: 2025-01-06

Migrations are frozen history: tables are defined here, never imported from
resources.ledger.schema. Every ALTER goes through op.batch_alter_table so SQLite works.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

RUNNING = "flow_status = 'running'"


def _count(name: str) -> sa.Column[int]:
    return sa.Column(name, sa.Integer, nullable=False, server_default=sa.text("0"))


def upgrade() -> None:
    op.create_table(
        "flow_metrics",
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("flow_name", sa.String(64), nullable=False),
        sa.Column("partition_key", sa.String(255), nullable=True),
        sa.Column(
            "flow_status", sa.String(32), nullable=False, server_default=sa.text("'running'")
        ),
        _count("source_record_count"),
        _count("dispatched_jobs"),
        _count("skipped_records"),
        _count("rejected_records"),
        _count("completed_jobs"),
        _count("failed_jobs"),
        sa.Column("pages_total", sa.Integer, nullable=True),
        _count("pages_done"),
        sa.Column("extraction_done", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("total_runtime_ms", sa.BigInteger, nullable=True),
        sa.Column("failure_reason", sa.Text, nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("run_id", name="pk_flow_metrics"),
        sa.CheckConstraint(
            "flow_status IN ('running', 'completed', 'failed', 'cancelled')",
            name=op.f("ck_flow_metrics_flow_status"),
        ),
    )
    op.create_index(
        "ix_flow_metrics_running",
        "flow_metrics",
        ["updated_at", "run_id"],
        sqlite_where=sa.text(RUNNING),
        postgresql_where=sa.text(RUNNING),
    )
    op.create_index(
        "ix_flow_metrics_flow_name_started_at", "flow_metrics", ["flow_name", "started_at"]
    )
    op.create_index("ix_flow_metrics_started_at", "flow_metrics", ["started_at"])
    op.create_table(
        "flow_page_progress",
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("page_index", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("status", sa.String(16), nullable=False),
        _count("source_records"),
        _count("dispatched"),
        _count("skipped"),
        _count("rejected"),
        _count("completed"),
        _count("failed"),
        sa.Column("claimed_keys", sa.Text, nullable=False, server_default=sa.text("'[]'")),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "page_index", name="pk_flow_page_progress"),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["flow_metrics.run_id"],
            name="fk_flow_page_progress_run_id_flow_metrics",
            ondelete="CASCADE",
        ),
        sa.CheckConstraint(
            "status IN ('dispatched', 'done')", name=op.f("ck_flow_page_progress_status")
        ),
    )


def downgrade() -> None:
    op.drop_table("flow_page_progress")
    op.drop_index("ix_flow_metrics_started_at", table_name="flow_metrics")
    op.drop_index("ix_flow_metrics_flow_name_started_at", table_name="flow_metrics")
    op.drop_index("ix_flow_metrics_running", table_name="flow_metrics")
    op.drop_table("flow_metrics")
