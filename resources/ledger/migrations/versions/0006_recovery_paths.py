"""Recovery paths: each run's own policy, its plan, ledger-owned keys, late job outcomes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30

* ``flow_metrics.run_policy``: the flow's policy (tolerance, deadline, dedup, dispatch,
  code location) as JSON, written when the run starts, so any finalizer decides the run
  with its own flow's policy.
* ``flow_metrics.awaiting_dagster``: finalized while its Dagster run was still in progress
  (stalled): the finalizer reopens it if that Dagster run later succeeds.
* ``flow_metrics.source_reported_total``: the record count the source said it holds.
* ``flow_metrics.source_down``: set by the step that found the source down; other steps
  of the run fail fast with the same error.
* ``flow_metrics.revision``: how many times the run was finalized (re-executions reopen it).
* ``flow_run_keys``: which page of a run owns each record key (the ledger decides; Redis is
  the fast path). Backfilled from the page rows' claimed keys.
* ``flow_async_jobs.late_at``: an RQ job outcome that arrived after its run was final.

Downgrade drops all of it.
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None

AWAITING = "awaiting_dagster"


def upgrade() -> None:
    with op.batch_alter_table("flow_metrics") as batch:
        batch.add_column(sa.Column("run_policy", sa.Text, nullable=True))
        batch.add_column(
            sa.Column("awaiting_dagster", sa.Boolean, nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("source_reported_total", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("source_down", sa.Text, nullable=True))
        batch.add_column(
            sa.Column("revision", sa.Integer, nullable=False, server_default=sa.text("0"))
        )
    op.create_index(
        "ix_flow_metrics_awaiting_dagster",
        "flow_metrics",
        ["run_id"],
        sqlite_where=sa.text(AWAITING),
        postgresql_where=sa.text(AWAITING),
    )
    with op.batch_alter_table("flow_async_jobs") as batch:
        batch.add_column(sa.Column("late_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "flow_run_keys",
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("record_key", sa.Text, nullable=False),
        sa.Column("page_index", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "record_key", name="pk_flow_run_keys"),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["flow_metrics.run_id"],
            name="fk_flow_run_keys_run_id_flow_metrics",
            ondelete="CASCADE",
        ),
    )
    _backfill_run_keys()


def _backfill_run_keys() -> None:
    """Each page's claimed keys become rows; a key two pages claimed goes to the lower one."""
    conn = op.get_bind()
    pages = conn.execute(
        sa.text(
            "SELECT run_id, page_index, claimed_keys FROM flow_page_progress"
            " ORDER BY run_id, page_index"
        )
    )
    run_keys = sa.table(
        "flow_run_keys",
        sa.column("run_id", sa.String),
        sa.column("record_key", sa.Text),
        sa.column("page_index", sa.Integer),
    )
    owners: dict[tuple[str, str], int] = {}
    for run_id, page_index, keys in pages:
        for key in json.loads(keys or "[]"):
            owners.setdefault((run_id, key), page_index)
    rows = [
        {"run_id": run_id, "record_key": key, "page_index": page}
        for (run_id, key), page in owners.items()
    ]
    for start in range(0, len(rows), 5000):
        conn.execute(run_keys.insert(), rows[start : start + 5000])


def downgrade() -> None:
    op.drop_table("flow_run_keys")
    with op.batch_alter_table("flow_async_jobs") as batch:
        batch.drop_column("late_at")
    op.drop_index("ix_flow_metrics_awaiting_dagster", table_name="flow_metrics")
    with op.batch_alter_table("flow_metrics") as batch:
        for column in (
            "revision",
            "source_down",
            "source_reported_total",
            "awaiting_dagster",
            "run_policy",
        ):
            batch.drop_column(column)
