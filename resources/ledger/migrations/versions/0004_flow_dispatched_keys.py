"""flow_dispatched_keys: record keys already dispatched by a flow (dedup="flow").

Revision ID: 0004
Revises: 0003
Create Date: 2025-01-07

Downgrade drops the table: revision 0003 has no place for it. Runs, pages, rejects and
failures are untouched; flows declared with dedup="flow" need this revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "flow_dispatched_keys",
        sa.Column("flow_name", sa.String(64), nullable=False),
        sa.Column("record_key", sa.Text, nullable=False),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("page_index", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("flow_name", "record_key", name="pk_flow_dispatched_keys"),
    )


def downgrade() -> None:
    op.drop_table("flow_dispatched_keys")
