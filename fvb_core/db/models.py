"""SQLAlchemy models. Alembic (``migrations/``) owns the schema; these must match it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fvb_core.jobs import BatchStatus, JobStatus


def utcnow() -> datetime:
    return datetime.now(UTC)


#: The predicate of the partial indexes over a batch's videos that the API shows.
LIVE = "deleted_at IS NULL"


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone: we put it back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime}


class Batch(Base):
    __tablename__ = "batches"
    __table_args__ = (UniqueConstraint("tenant", "name", name="uq_batches_tenant_name"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    #: The tenant's name for it (``fvb bulk submit --name``): resubmitting under it resumes.
    name: Mapped[str | None] = mapped_column(String(128), default=None)
    #: Seconds its videos' objects are kept after they finish (NULL: the deployment's).
    retention_s: Mapped[int | None] = mapped_column(Integer, default=None)
    status: Mapped[str] = mapped_column(String(16), default=BatchStatus.OPEN)
    params: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        Index("ix_jobs_status_priority_created", "status", "priority", "created_at"),
        # The lists, newest first, keyset-paged by (created_at, id): a tenant's (the API's
        # and the console's), a batch's, and every tenant's (an operator's console).
        Index(
            "ix_jobs_tenant_listed",
            "tenant",
            "created_at",
            "id",
            sqlite_where=text(LIVE),
            postgresql_where=text(LIVE),
        ),
        Index(
            "ix_jobs_batch_listed",
            "batch_id",
            "created_at",
            "id",
            sqlite_where=text(LIVE),
            postgresql_where=text(LIVE),
        ),
        Index(
            "ix_jobs_listed",
            "created_at",
            "id",
            sqlite_where=text(LIVE),
            postgresql_where=text(LIVE),
        ),
        # The scheduler's two questions, each over a partial index so its cost follows what
        # it asks for, not the size of the table: which jobs of a pool wait to be released
        # (per tenant, best first), and which are released but not yet claimed.
        Index(
            "ix_jobs_ready",
            "pool",
            "tenant",
            "priority",
            "created_at",
            sqlite_where=text("status = 'queued' AND dispatched_at IS NULL"),
            postgresql_where=text("status = 'queued' AND dispatched_at IS NULL"),
        ),
        Index(
            "ix_jobs_released",
            "pool",
            "dispatched_at",
            sqlite_where=text("status = 'queued' AND dispatched_at IS NOT NULL"),
            postgresql_where=text("status = 'queued' AND dispatched_at IS NOT NULL"),
        ),
        Index("ix_jobs_tenant_finished", "tenant", "finished_at"),
        # The fleet's last minutes (every tenant's finished work): the console's workers.
        Index("ix_jobs_finished", "finished_at"),
        # A batch's counts and "is anything of it unfinished" without visiting its rows
        # (partial: every such question leaves deleted videos out, and so an index-only
        # scan answers it; deleted videos are always finished ones).
        Index(
            "ix_jobs_batch_status",
            "batch_id",
            "status",
            sqlite_where=text(LIVE),
            postgresql_where=text(LIVE),
        ),
        # Its items in a stable order (pages, the manifest), and its throughput lately.
        Index("ix_jobs_batch_item", "batch_id", "id"),
        Index(
            "ix_jobs_batch_finished",
            "batch_id",
            "finished_at",
            sqlite_where=text(LIVE),
            postgresql_where=text(LIVE),
        ),
        # The retention sweeper's question: which stored videos are past their expiry.
        Index(
            "ix_jobs_expiring",
            "expires_at",
            sqlite_where=text("expires_at IS NOT NULL AND expired_at IS NULL"),
            postgresql_where=text("expires_at IS NOT NULL AND expired_at IS NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(128))
    #: The GPU pool whose workers run it (the model's, when the job was created).
    pool: Mapped[str] = mapped_column(String(64), default="default", server_default="default")
    #: Estimated GPU work (``JobParams.work``): fair share weighs tenants by it.
    work: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    #: The validated request: prompt, size, frames, steps, guidance, seed, fps, image key...
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    #: The fence: every write by a worker names the attempt it claimed.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), default=None)
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    batch_id: Mapped[str | None] = mapped_column(
        ForeignKey("batches.id", ondelete="SET NULL"), default=None
    )
    progress: Mapped[int] = mapped_column(Integer, default=0)
    stage_timings: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker_id: Mapped[str | None] = mapped_column(String(255), default=None)
    output_key: Mapped[str | None] = mapped_column(String(512), default=None)
    output_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    output_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: When the scheduler released it to its pool's queue (NULL: waiting in the database).
    dispatched_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)
    #: Seconds its objects are kept once it finished (its batch's or the deployment's at
    #: create; NULL: kept until deleted). ``expires_at`` is set from it when it succeeds.
    retention_s: Mapped[int | None] = mapped_column(Integer, default=None)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    #: When the sweeper deleted its objects.
    expired_at: Mapped[datetime | None] = mapped_column(default=None)
    #: What the worker recorded of the render it stored: frames, fps, width, height, model
    #: revision, GPU name (``fvb_core.jobs.JobResult``).
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class JobEvent(Base):
    """One row per state transition: the audit trail of a job."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    from_status: Mapped[str | None] = mapped_column(String(16), default=None)
    to_status: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer)
    detail: Mapped[str | None] = mapped_column(Text, default=None)
    #: Folded into the roll-ups (``fvb_core/db/rollup.py``) yet? The partial index finds the
    #: few that are not, whatever the size of the trail.
    rolled_up: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    __table_args__ = (
        Index(
            "ix_job_events_pending",
            "id",
            sqlite_where=text("NOT rolled_up"),
            postgresql_where=text("NOT rolled_up"),
        ),
    )


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str | None] = mapped_column(String(128), default=None)
    #: sha256 of the key; the key itself is shown once, at creation.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    #: An operator key may read /metrics (and, beyond its tenant, the whole fleet).
    operator: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    #: The tenant's queued-jobs limit while this key is used; NULL: ``max_queued_jobs``.
    max_queued: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class TenantCounter(Base):
    """Per tenant: its queued jobs, kept by the transitions in the same transaction as the
    state change, so admission reads one row instead of counting the tenant's backlog."""

    __tablename__ = "tenant_counters"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    queued: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class FairShare(Base):
    """What each tenant has been served in a pool: GPU work released to it, decaying with a
    half-life (``fair_share_half_life_s``), so the one served least lately goes next."""

    __tablename__ = "fair_shares"

    pool: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    served: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Worker(Base):
    """A live (or lately live) Celery consumer: its pool and GPU group, its last beat."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    pool: Mapped[str] = mapped_column(String(64), index=True)
    gpus: Mapped[int] = mapped_column(Integer, default=1)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(default=None)
    #: What the worker said of itself at its last beat (``worker/telemetry.py``): its GPUs
    #: (name, memory, utilisation, temperature), uploads, the models it holds.
    stats: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class WorkerModels(Base):
    """The models a job process of a worker holds loaded (``Job.worker_id``'s process:
    ``host:pid:group``), written by it when its pipeline cache changes."""

    __tablename__ = "worker_models"

    job_worker_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    models: Mapped[list[str]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Lease(Base):
    """A named lease one process holds until ``expires_at`` (the scheduler's leadership)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime] = mapped_column()


class Webhook(Base):
    """A URL a tenant (``batch_id`` NULL: all its jobs) or one batch registered for events."""

    __tablename__ = "webhooks"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    batch_id: Mapped[str | None] = mapped_column(
        ForeignKey("batches.id", ondelete="CASCADE"), default=None, index=True
    )
    url: Mapped[str] = mapped_column(Text)
    #: ``whsec_<base64>``: the standard-webhooks signing secret, shown once at registration.
    secret: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookEvent(Base):
    """The outbox: one row per (webhook, event), written in the transaction of the state
    change it reports, delivered at least once by the scheduler process. ``id`` is the
    event id receivers de-duplicate by; ``dedupe_key`` keeps one event from being queued twice."""

    __tablename__ = "webhook_events"
    __table_args__ = (
        UniqueConstraint("webhook_id", "dedupe_key", name="uq_webhook_events_dedupe"),
        Index(
            "ix_webhook_events_due",
            "next_attempt_at",
            sqlite_where=text("delivered_at IS NULL AND given_up_at IS NULL"),
            postgresql_where=text("delivered_at IS NULL AND given_up_at IS NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(32))
    dedupe_key: Mapped[str] = mapped_column(String(160))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)
    given_up_at: Mapped[datetime | None] = mapped_column(default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)


# -- roll-ups: the job trail folded into small tables (fvb_core/db/rollup.py) ----------------


class JobCount(Base):
    """Jobs by (tenant, model, status), deleted ones left out: what the dashboard's cards,
    its pools and /metrics' ``fvb_jobs`` read instead of counting the jobs table."""

    __tablename__ = "job_counts"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class JobOutcome(Base):
    """Counters that only grow: completed, failed (by error code), cancelled, retried,
    requeued and deleted jobs per (tenant, model), and the bytes of the videos stored."""

    __tablename__ = "job_outcomes"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    outcome: Mapped[str] = mapped_column(String(16), primary_key=True)
    #: The error code of a failed job; "" for every other outcome.
    error_code: Mapped[str] = mapped_column(String(64), primary_key=True, default="")
    n: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    output_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class JobLatency(Base):
    """A Prometheus-style histogram per (model, metric): ``queue_wait`` (created -> started)
    and ``render`` (started -> finished) of succeeded jobs; ``buckets`` counts per upper
    bound of ``rollup.LATENCY_BUCKETS`` (not cumulative), ``total_s`` their sum."""

    __tablename__ = "job_latency"

    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    metric: Mapped[str] = mapped_column(String(16), primary_key=True)
    buckets: Mapped[list[int]] = mapped_column(JSON)
    n: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    total_s: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")


class JobMinute(Base):
    """Per minute of finishing, per (tenant, model): jobs completed and failed, and the
    completed ones' queue-wait and render histograms (``rollup.LATENCY_BUCKETS``): the
    console's throughput and charts, whatever the fleet finishes an hour."""

    __tablename__ = "job_minutes"

    minute: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    completed: Mapped[int] = mapped_column(BigInteger, default=0)
    failed: Mapped[int] = mapped_column(BigInteger, default=0)
    queue_wait: Mapped[list[int]] = mapped_column(JSON)
    render: Mapped[list[int]] = mapped_column(JSON)


class QueueSample(Base):
    """Queued and running jobs per GPU pool, sampled once a minute by the scheduler: the
    dashboard's queue-depth chart."""

    __tablename__ = "queue_samples"

    minute: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)
    pool: Mapped[str] = mapped_column(String(64), primary_key=True)
    queued: Mapped[int] = mapped_column(BigInteger, default=0)
    running: Mapped[int] = mapped_column(BigInteger, default=0)


class WebhookCount(Base):
    """Webhook delivery attempts by outcome (delivered, failed, given_up), counted by the
    delivery pass as it records them: /metrics' ``fvb_webhook_deliveries_total``."""

    __tablename__ = "webhook_counts"

    outcome: Mapped[str] = mapped_column(String(16), primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger, default=0)
