"""Quarantine and job-failure tables; counter_mismatch and published_at on flow_metrics.

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

RUNNING = "flow_status = 'running'"
UNPUBLISHED = "published_at IS NULL AND flow_status <> 'running'"


def _run_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["run_id"],
        ["flow_metrics.run_id"],
        name=f"fk_{table}_run_id_flow_metrics",
        ondelete="CASCADE",
    )


def upgrade() -> None:
    with op.batch_alter_table("flow_metrics") as batch:
        batch.add_column(sa.Column("counter_mismatch", sa.Text, nullable=True))
        batch.add_column(sa.Column("published_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_flow_metrics_unpublished",
        "flow_metrics",
        ["finished_at", "run_id"],
        sqlite_where=sa.text(UNPUBLISHED),
        postgresql_where=sa.text(UNPUBLISHED),
    )
    op.create_table(
        "flow_rejected_records",
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("page_index", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("position", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("raw_record", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint(
            "run_id", "page_index", "position", name="pk_flow_rejected_records"
        ),
        _run_fk("flow_rejected_records"),
    )
    op.create_table(
        "flow_job_failures",
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("record_key", sa.Text, nullable=False),
        sa.Column("page_index", sa.Integer, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "record_key", name="pk_flow_job_failures"),
        _run_fk("flow_job_failures"),
    )
    op.create_index(
        "ix_flow_job_failures_run_id_page_index", "flow_job_failures", ["run_id", "page_index"]
    )


def downgrade() -> None:
    op.drop_index("ix_flow_job_failures_run_id_page_index", table_name="flow_job_failures")
    op.drop_table("flow_job_failures")
    op.drop_table("flow_rejected_records")
    op.drop_index("ix_flow_metrics_unpublished", table_name="flow_metrics")
    # SQLite recreates the table here; SQLAlchemy before 2.1 loses a partial index's
    # WHERE clause, so the running-rows index is rebuilt explicitly (as in 0002).
    op.drop_index("ix_flow_metrics_running", table_name="flow_metrics")
    with op.batch_alter_table("flow_metrics") as batch:
        batch.drop_column("published_at")
        batch.drop_column("counter_mismatch")
    op.create_index(
        "ix_flow_metrics_running",
        "flow_metrics",
        ["updated_at", "run_id"],
        sqlite_where=sa.text(RUNNING),
        postgresql_where=sa.text(RUNNING),
    )
