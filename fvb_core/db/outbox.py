"""The webhooks' outbox: events written in the transaction of the state change they report.

Every transition that ends a job (``fvb_core/db/transitions.py``) calls
:func:`job_finished` with the jobs it ended. For a tenant without webhooks that is one
indexed lookup (``webhooks.tenant``) and nothing else. Otherwise each webhook of the tenant
that covers the job (``batch_id`` NULL, or the job's batch) gets a ``video.completed`` or
``video.failed`` event (a cancelled video is failed with ``error.code = "cancelled"``, as the
API shows it), and, when the job's batch has no unfinished video left, a
``batch.completed`` event. Rows go in with ``ON CONFLICT DO NOTHING`` on
``(webhook_id, dedupe_key)``, so one fact is never queued twice for one webhook.

The scheduler process delivers them (``scheduler/webhooks.py``); a rolled-back transition
leaves no event, a committed one always has its events.

``batch.completed`` under concurrency: two jobs of a batch finishing at once in two
transactions (READ COMMITTED) could each see the other's job unfinished, and neither would
report the batch. So the finisher takes a lock per batch before it looks (PostgreSQL: a
transaction-level advisory lock; SQLite runs one writer at a time anyway): the second to
take it sees the first one's job committed. The lock is advisory rather than a
``SELECT ... FOR UPDATE`` of the batch row: a batch cancel (``scheduler/api/batches.py``)
updates the batch row first and the jobs second, and a worker finishing one of those jobs
holds the job first; waiting on the batch row would deadlock the two.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import exists, func, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from fvb_core.db.models import Batch, Job, Webhook, WebhookCount, WebhookEvent, utcnow
from fvb_core.jobs import FINAL_STATUSES, UNFINISHED_STATUSES, BatchStatus, JobStatus

VIDEO_COMPLETED = "video.completed"
VIDEO_FAILED = "video.failed"
BATCH_COMPLETED = "batch.completed"
EVENT_TYPES = (VIDEO_COMPLETED, VIDEO_FAILED, BATCH_COMPLETED)

#: Jobs read back per statement (under every database's bound-parameter limit).
_CHUNK = 500
_FINAL = tuple(s.value for s in FINAL_STATUSES)
_UNFINISHED = tuple(s.value for s in UNFINISHED_STATUSES)


def new_event_id() -> str:
    """A standard-webhooks message id (``webhook-id``): ``msg_`` + 24 hex digits."""
    return f"msg_{secrets.token_hex(12)}"


def _unix(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def video_data(job: Any) -> dict[str, Any]:
    """The video as the event shows it: the API's video object, compact."""
    error = None
    if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
        default = "cancelled" if job.status == JobStatus.CANCELLED else "failed"
        error = {"code": job.error_code or default, "message": job.error_message or default}
    metadata = (job.params or {}).get("metadata") or None
    return {
        "id": job.id,
        "object": "video",
        "status": "completed" if job.status == JobStatus.SUCCEEDED else "failed",
        "model": job.model,
        "batch_id": job.batch_id,
        "created_at": _unix(job.created_at),
        "completed_at": _unix(job.finished_at),
        "error": error,
        "metadata": metadata,
    }


def _row(webhook_id: str, kind: str, dedupe_key: str, data: dict, now: datetime) -> dict:
    event_id = new_event_id()
    return dict(
        id=event_id,
        webhook_id=webhook_id,
        type=kind,
        dedupe_key=dedupe_key,
        payload={"id": event_id, "type": kind, "created_at": _unix(now), "data": data},
        created_at=now,
        next_attempt_at=now,
        attempts=0,
    )


def insert_events(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Queue events; one already queued for its webhook (same dedupe key) is left alone."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    upsert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}[dialect]
    statement = upsert(WebhookEvent).on_conflict_do_nothing(
        index_elements=[WebhookEvent.webhook_id, WebhookEvent.dedupe_key]
    )
    session.execute(statement, list(rows))


def _lock_batch(session: Session, batch_id: str) -> None:
    """Serialise the "is the batch finished" question per batch (see the module docstring)."""
    if session.get_bind().dialect.name != "postgresql":
        return  # SQLite: the writing transaction already holds the database's write lock
    digest = hashlib.blake2b(f"fvb.batch:{batch_id}".encode(), digest_size=8).digest()
    key = int.from_bytes(digest, "big", signed=True)
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def batch_data(session: Session, batch_id: str) -> dict[str, Any] | None:
    """The finished batch as the event shows it (the API's batch object), or None while any
    of its videos is unfinished."""
    unfinished = session.execute(
        select(
            exists().where(
                Job.batch_id == batch_id, Job.status.in_(_UNFINISHED), Job.deleted_at.is_(None)
            )
        )
    ).scalar()
    if unfinished:
        return None
    batch = session.execute(
        select(Batch.id, Batch.name, Batch.status, Batch.created_at, Batch.params).where(
            Batch.id == batch_id
        )
    ).one_or_none()
    if batch is None:
        return None
    by_status: dict[str, int] = {}
    every, latest = 0, None
    for status, count, deleted, last in session.execute(
        select(Job.status, func.count(), func.count(Job.deleted_at), func.max(Job.finished_at))
        .where(Job.batch_id == batch_id)
        .group_by(Job.status)
    ).all():
        by_status[status] = count - deleted
        every += count
        if last is not None and (latest is None or last > latest):
            latest = last
    counts = {
        "total": sum(by_status.values()),
        "queued": 0,
        "in_progress": 0,
        "completed": by_status.get(JobStatus.SUCCEEDED, 0),
        "failed": by_status.get(JobStatus.FAILED, 0),
        "cancelled": by_status.get(JobStatus.CANCELLED, 0),
    }
    return {
        "id": batch.id,
        "object": "batch",
        "status": "cancelled" if batch.status == BatchStatus.CANCELLED else "completed",
        "name": batch.name,
        "created_at": _unix(batch.created_at),
        "metadata": (batch.params or {}).get("metadata"),
        "request_counts": counts,
        # What makes this completion one fact (the dedupe key, not sent): its jobs, deleted
        # ones too, and the last finish. The batch completes again, as another event, only
        # after videos joined it or were retried.
        "_completion": f"{every}:{latest.isoformat() if latest else ''}",
    }


def job_finished(session: Session, finished: Iterable[tuple[str, str]]) -> None:
    """Queue the events of jobs that just reached a final state: ``(job id, tenant)`` each,
    called by the transition in its own transaction, after its UPDATE."""
    finished = list(finished)
    if not finished:
        return
    tenants = sorted({tenant for _, tenant in finished})
    hooks = session.execute(
        select(Webhook.id, Webhook.tenant, Webhook.batch_id).where(Webhook.tenant.in_(tenants))
    ).all()
    if not hooks:
        return
    by_tenant: dict[str, list[Any]] = defaultdict(list)
    for hook in hooks:
        by_tenant[hook.tenant].append(hook)
    ids = sorted({job_id for job_id, tenant in finished if tenant in by_tenant})
    columns = (
        Job.id,
        Job.tenant,
        Job.model,
        Job.batch_id,
        Job.status,
        Job.attempt,
        Job.error_code,
        Job.error_message,
        Job.params,
        Job.created_at,
        Job.finished_at,
    )
    now = utcnow()
    rows: list[dict[str, Any]] = []
    batches: dict[str, list[Any]] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        for job in session.execute(select(*columns).where(Job.id.in_(chunk))).all():
            if job.status not in _FINAL:
                continue
            covering = [h for h in by_tenant[job.tenant] if h.batch_id in (None, job.batch_id)]
            if not covering:
                continue
            kind = VIDEO_COMPLETED if job.status == JobStatus.SUCCEEDED else VIDEO_FAILED
            data = video_data(job)
            key = f"{kind}:{job.id}:{job.attempt}"
            rows += [_row(hook.id, kind, key, data, now) for hook in covering]
            if job.batch_id is not None:
                batches[job.batch_id] = covering
    for batch_id in sorted(batches):  # sorted: two finishers take the locks in one order
        _lock_batch(session, batch_id)
        data = batch_data(session, batch_id)
        if data is None:
            continue
        key = f"{BATCH_COMPLETED}:{batch_id}:{data.pop('_completion')}"
        rows += [_row(hook.id, BATCH_COMPLETED, key, data, now) for hook in batches[batch_id]]
    insert_events(session, rows)


def count_delivery(session: Session, outcome: str) -> None:
    """One delivery attempt's outcome (delivered, failed, given_up) added to its counter."""
    upsert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}[
        session.get_bind().dialect.name
    ]
    statement = upsert(WebhookCount).values(outcome=outcome, n=1)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[WebhookCount.outcome], set_={"n": WebhookCount.n + 1}
        )
    )


def delivery_counts(session: Session) -> dict[str, int]:
    return dict(session.execute(select(WebhookCount.outcome, WebhookCount.n)).all())
