"""bulk datasets: named batches, per-batch retention, expiry, worker-recorded results,
webhooks and their durable outbox

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LIVE = "deleted_at IS NULL"  # what the API counts: deleted videos left out
EXPIRING = "expires_at IS NOT NULL AND expired_at IS NULL"
PENDING = "delivered_at IS NULL AND given_up_at IS NULL"


def upgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("name", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("retention_s", sa.Integer(), nullable=True))
        batch_op.create_unique_constraint("uq_batches_tenant_name", ["tenant", "name"])
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("retention_s", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("result", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("expired_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_jobs_batch_status",
        "jobs",
        ["batch_id", "status"],
        sqlite_where=sa.text(LIVE),
        postgresql_where=sa.text(LIVE),
    )
    # A batch's items in a stable order (pages, the manifest) and its throughput lately;
    # (batch_id, id) also serves every lookup the single-column index did.
    op.drop_index("ix_jobs_batch_id", table_name="jobs")
    op.create_index("ix_jobs_batch_item", "jobs", ["batch_id", "id"])
    op.create_index(
        "ix_jobs_batch_finished",
        "jobs",
        ["batch_id", "finished_at"],
        sqlite_where=sa.text(LIVE),
        postgresql_where=sa.text(LIVE),
    )
    op.create_index(
        "ix_jobs_expiring",
        "jobs",
        ["expires_at"],
        sqlite_where=sa.text(EXPIRING),
        postgresql_where=sa.text(EXPIRING),
    )
    op.create_table(
        "webhooks",
        sa.Column("id", sa.String(length=64), primary_key=True),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column(
            "batch_id",
            sa.String(length=64),
            sa.ForeignKey("batches.id", ondelete="CASCADE"),
            nullable=True,
        ),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("secret", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_webhooks_tenant", "webhooks", ["tenant"])
    op.create_index("ix_webhooks_batch_id", "webhooks", ["batch_id"])
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.String(length=64), primary_key=True),
        sa.Column(
            "webhook_id",
            sa.String(length=64),
            sa.ForeignKey("webhooks.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("dedupe_key", sa.String(length=160), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("given_up_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.UniqueConstraint("webhook_id", "dedupe_key", name="uq_webhook_events_dedupe"),
    )
    op.create_index(
        "ix_webhook_events_due",
        "webhook_events",
        ["next_attempt_at"],
        sqlite_where=sa.text(PENDING),
        postgresql_where=sa.text(PENDING),
    )


def downgrade() -> None:
    op.drop_index("ix_webhook_events_due", table_name="webhook_events")
    op.drop_table("webhook_events")
    op.drop_index("ix_webhooks_batch_id", table_name="webhooks")
    op.drop_index("ix_webhooks_tenant", table_name="webhooks")
    op.drop_table("webhooks")
    op.drop_index("ix_jobs_expiring", table_name="jobs")
    op.drop_index("ix_jobs_batch_status", table_name="jobs")
    op.drop_index("ix_jobs_batch_finished", table_name="jobs")
    op.drop_index("ix_jobs_batch_item", table_name="jobs")
    op.create_index("ix_jobs_batch_id", "jobs", ["batch_id"])
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("expired_at")
        batch_op.drop_column("expires_at")
        batch_op.drop_column("result")
        batch_op.drop_column("retention_s")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_constraint("uq_batches_tenant_name", type_="unique")
        batch_op.drop_column("retention_s")
        batch_op.drop_column("name")
