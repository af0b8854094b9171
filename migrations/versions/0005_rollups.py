"""roll-ups of the job trail (job counts, outcomes, latency histograms, minutes, queue
samples) for the console and /metrics; worker telemetry

Existing events are left to fold (``rolled_up`` false): the scheduler's first passes fold
the whole history, so the counts are right from the start. Jobs deleted before this
revision had no event for it; one is written for each here, so that they leave the counts.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LIVE = "deleted_at IS NULL"
LISTS = {
    "ix_jobs_tenant_listed": ["tenant", "created_at", "id"],
    "ix_jobs_batch_listed": ["batch_id", "created_at", "id"],
    "ix_jobs_listed": ["created_at", "id"],
}


def upgrade() -> None:
    with op.batch_alter_table("job_events", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("rolled_up", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.create_index(
        "ix_job_events_pending",
        "job_events",
        ["id"],
        sqlite_where=sa.text("NOT rolled_up"),
        postgresql_where=sa.text("NOT rolled_up"),
    )
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stats", sa.JSON(), nullable=True))
    op.create_index("ix_jobs_finished", "jobs", ["finished_at"])
    # The lists keyset-paged by (created_at, id), deleted videos left out (the console's).
    op.drop_index("ix_jobs_tenant_created", table_name="jobs")
    for name, columns in LISTS.items():
        op.create_index(
            name, "jobs", columns, sqlite_where=sa.text(LIVE), postgresql_where=sa.text(LIVE)
        )
    op.create_table(
        "worker_models",
        sa.Column("job_worker_id", sa.String(length=255), primary_key=True),
        sa.Column("models", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "job_counts",
        sa.Column("tenant", sa.String(length=128), primary_key=True),
        sa.Column("model", sa.String(length=128), primary_key=True),
        sa.Column("status", sa.String(length=16), primary_key=True),
        sa.Column("n", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.create_table(
        "job_outcomes",
        sa.Column("tenant", sa.String(length=128), primary_key=True),
        sa.Column("model", sa.String(length=128), primary_key=True),
        sa.Column("outcome", sa.String(length=16), primary_key=True),
        sa.Column("error_code", sa.String(length=64), primary_key=True),
        sa.Column("n", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("output_bytes", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.create_table(
        "job_latency",
        sa.Column("model", sa.String(length=128), primary_key=True),
        sa.Column("metric", sa.String(length=16), primary_key=True),
        sa.Column("buckets", sa.JSON(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("total_s", sa.Float(), nullable=False, server_default="0"),
    )
    op.create_table(
        "job_minutes",
        sa.Column("minute", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("tenant", sa.String(length=128), primary_key=True),
        sa.Column("model", sa.String(length=128), primary_key=True),
        sa.Column("completed", sa.BigInteger(), nullable=False),
        sa.Column("failed", sa.BigInteger(), nullable=False),
        sa.Column("queue_wait", sa.JSON(), nullable=False),
        sa.Column("render", sa.JSON(), nullable=False),
    )
    op.create_table(
        "webhook_counts",
        sa.Column("outcome", sa.String(length=16), primary_key=True),
        sa.Column("n", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "queue_samples",
        sa.Column("minute", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("pool", sa.String(length=64), primary_key=True),
        sa.Column("queued", sa.BigInteger(), nullable=False),
        sa.Column("running", sa.BigInteger(), nullable=False),
    )
    op.execute(
        "INSERT INTO job_events (job_id, at, from_status, to_status, attempt, detail, rolled_up) "
        "SELECT id, deleted_at, status, status, attempt, 'deleted', "
        f"{'false' if op.get_bind().dialect.name == 'postgresql' else '0'} "
        "FROM jobs WHERE deleted_at IS NOT NULL"
    )


def downgrade() -> None:
    op.execute("DELETE FROM job_events WHERE detail = 'deleted'")
    op.drop_table("queue_samples")
    op.drop_table("webhook_counts")
    op.drop_table("job_minutes")
    op.drop_table("job_latency")
    op.drop_table("job_outcomes")
    op.drop_table("job_counts")
    op.drop_index("ix_jobs_finished", table_name="jobs")
    for name in LISTS:
        op.drop_index(name, table_name="jobs")
    op.create_index("ix_jobs_tenant_created", "jobs", ["tenant", "created_at"])
    op.drop_table("worker_models")
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_column("stats")
    op.drop_index("ix_job_events_pending", table_name="job_events")
    with op.batch_alter_table("job_events", schema=None) as batch_op:
        batch_op.drop_column("rolled_up")
