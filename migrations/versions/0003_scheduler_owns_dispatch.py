"""the scheduler owns dispatch: jobs.pool/work, partial indexes for release, tenant counters,
workers, leases, per-key queued limits

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

READY = "status = 'queued' AND dispatched_at IS NULL"
RELEASED = "status = 'queued' AND dispatched_at IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("pool", sa.String(length=64), nullable=False, server_default="default")
        )
        batch_op.add_column(sa.Column("work", sa.Float(), nullable=False, server_default="0"))
    op.create_index(
        "ix_jobs_ready",
        "jobs",
        ["pool", "tenant", "priority", "created_at"],
        sqlite_where=sa.text(READY),
        postgresql_where=sa.text(READY),
    )
    op.create_index(
        "ix_jobs_released",
        "jobs",
        ["pool", "dispatched_at"],
        sqlite_where=sa.text(RELEASED),
        postgresql_where=sa.text(RELEASED),
    )
    op.create_index("ix_jobs_tenant_finished", "jobs", ["tenant", "finished_at"])
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_queued", sa.Integer(), nullable=True))
    op.create_table(
        "tenant_counters",
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("queued", sa.Integer(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("tenant"),
    )
    # Jobs queued before this revision are counted once, here.
    op.execute(
        "INSERT INTO tenant_counters (tenant, queued) "
        "SELECT tenant, count(*) FROM jobs WHERE status = 'queued' GROUP BY tenant"
    )
    op.create_table(
        "fair_shares",
        sa.Column("pool", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("served", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("pool", "tenant"),
    )
    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("pool", sa.String(length=64), nullable=False),
        sa.Column("gpus", sa.Integer(), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_workers_pool", "workers", ["pool"])
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=255), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("leases")
    op.drop_index("ix_workers_pool", table_name="workers")
    op.drop_table("workers")
    op.drop_table("fair_shares")
    op.drop_table("tenant_counters")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("max_queued")
    op.drop_index("ix_jobs_tenant_finished", table_name="jobs")
    op.drop_index("ix_jobs_released", table_name="jobs")
    op.drop_index("ix_jobs_ready", table_name="jobs")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("work")
        batch_op.drop_column("pool")
