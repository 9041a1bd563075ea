"""Add the partial_success status to flow_metrics.flow_status.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-06

Downgrade keeps every row: partial_success runs become completed (the closest status the
narrower domain has) before the constraint is narrowed.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

CONSTRAINT = "ck_flow_metrics_flow_status"
RUNNING = "flow_status = 'running'"
WIDE = "flow_status IN ('running', 'completed', 'partial_success', 'failed', 'cancelled')"
NARROW = "flow_status IN ('running', 'completed', 'failed', 'cancelled')"


def _replace_check(condition: str) -> None:
    # On SQLite the batch recreates the table, and SQLAlchemy before 2.1 does not reflect a partial
    # index's WHERE clause: drop the partial index first and build it again afterwards.
    op.drop_index("ix_flow_metrics_running", table_name="flow_metrics")
    with op.batch_alter_table("flow_metrics") as batch:
        batch.drop_constraint(op.f(CONSTRAINT), type_="check")
        batch.create_check_constraint(op.f(CONSTRAINT), sa.text(condition))
    op.create_index(
        "ix_flow_metrics_running",
        "flow_metrics",
        ["updated_at", "run_id"],
        sqlite_where=sa.text(RUNNING),
        postgresql_where=sa.text(RUNNING),
    )


def upgrade() -> None:
    _replace_check(WIDE)


def downgrade() -> None:
    op.execute(
        "UPDATE flow_metrics SET flow_status = 'completed' WHERE flow_status = 'partial_success'"
    )
    _replace_check(NARROW)
