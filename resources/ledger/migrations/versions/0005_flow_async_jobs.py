"""flow_async_jobs: the state of each job dispatched to RQ workers (dispatch="rq").

Revision ID: 0005
Revises: 0004
Create Date: 2025-01-07

Downgrade drops the table: revision 0004 has no place for job states, and its page rows
alone count such jobs as pending.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "flow_async_jobs",
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("record_key", sa.Text, nullable=False),
        sa.Column("page_index", sa.Integer, nullable=False),
        sa.Column("job_id", sa.String(160), nullable=False),
        sa.Column("state", sa.String(16), nullable=False, server_default=sa.text("'pending'")),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "record_key", name="pk_flow_async_jobs"),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["flow_metrics.run_id"],
            name="fk_flow_async_jobs_run_id_flow_metrics",
            ondelete="CASCADE",
        ),
        sa.CheckConstraint(
            "state IN ('pending', 'completed', 'failed')", name=op.f("ck_flow_async_jobs_state")
        ),
    )
    op.create_index(
        "ix_flow_async_jobs_run_id_page_index_state",
        "flow_async_jobs",
        ["run_id", "page_index", "state"],
    )


def downgrade() -> None:
    op.drop_index("ix_flow_async_jobs_run_id_page_index_state", table_name="flow_async_jobs")
    op.drop_table("flow_async_jobs")
