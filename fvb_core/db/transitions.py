"""The job state machine. Each transition is one guarded UPDATE plus its audit event.

``queued -> running -> succeeded | failed | cancelled``, and ``running -> queued`` on a retry.
A worker's writes name the attempt it claimed (``WHERE id = ? AND status = 'running' AND
attempt = ?``), so a redelivered or stale worker matches no row and changes nothing: the
attempt number is the fence. Callers commit the session; a transition that matched no row
returns False and writes no event.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, select, update
from sqlalchemy.orm import Session

from fvb_core.db.models import Job, JobEvent, utcnow
from fvb_core.jobs import JobStatus

QUEUED, RUNNING = JobStatus.QUEUED.value, JobStatus.RUNNING.value
SUCCEEDED, FAILED, CANCELLED = (
    JobStatus.SUCCEEDED.value,
    JobStatus.FAILED.value,
    JobStatus.CANCELLED.value,
)


def new_job_id() -> str:
    return f"video_{secrets.token_hex(12)}"


def _transition(
    session: Session,
    job_id: str,
    guard: ColumnElement[bool],
    from_status: str | None,
    values: dict[str, Any],
    event_attempt: int,
    detail: str | None = None,
) -> bool:
    now = utcnow()
    result = session.execute(
        update(Job).where(Job.id == job_id, guard).values(updated_at=now, **values)
    )
    if result.rowcount != 1:
        return False
    if "status" in values:
        session.add(
            JobEvent(
                job_id=job_id,
                at=now,
                from_status=from_status,
                to_status=values["status"],
                attempt=event_attempt,
                detail=detail,
            )
        )
    return True


def _owned(attempt: int) -> ColumnElement[bool]:
    return and_(Job.status == RUNNING, Job.attempt == attempt)


def create_job(session: Session, job: Job) -> Job:
    job.id = job.id or new_job_id()
    job.status = QUEUED
    job.attempt = 0
    session.add(job)
    session.flush()
    session.add(JobEvent(job_id=job.id, at=job.created_at, to_status=QUEUED, attempt=0))
    return job


@dataclass(frozen=True)
class Claim:
    job_id: str
    attempt: int
    params: dict[str, Any]
    model: str


def claim(session: Session, job_id: str, worker_id: str) -> Claim | None:
    """queued -> running as attempt n+1, or None when the job is not there to take."""
    row = session.execute(
        select(Job.status, Job.attempt, Job.cancel_requested, Job.params, Job.model).where(
            Job.id == job_id
        )
    ).one_or_none()
    if row is None or row.status != QUEUED or row.cancel_requested:
        return None
    now = utcnow()
    attempt = row.attempt + 1
    won = _transition(
        session,
        job_id,
        and_(Job.status == QUEUED, Job.attempt == row.attempt, Job.cancel_requested.is_(False)),
        QUEUED,
        dict(
            status=RUNNING,
            attempt=attempt,
            worker_id=worker_id,
            started_at=now,
            heartbeat_at=now,
            progress=0,
            error_code=None,
            error_message=None,
        ),
        attempt,
        detail=f"worker {worker_id}",
    )
    return Claim(job_id, attempt, row.params, row.model) if won else None


@dataclass(frozen=True)
class Heartbeat:
    still_owner: bool
    cancel_requested: bool


def heartbeat(
    session: Session, job_id: str, attempt: int, progress: int | None = None
) -> Heartbeat:
    """Record liveness (and progress 0-100) for the attempt; tell whether to stop."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = max(0, min(100, int(progress)))
    owner = _transition(session, job_id, _owned(attempt), None, values, attempt)
    cancel = session.execute(select(Job.cancel_requested).where(Job.id == job_id)).scalar()
    return Heartbeat(still_owner=owner, cancel_requested=bool(cancel))


def succeed(
    session: Session,
    job_id: str,
    attempt: int,
    output_key: str,
    output_bytes: int,
    output_sha256: str,
    stage_timings: dict[str, float] | None = None,
) -> bool:
    """running -> succeeded, recording the output in the same statement. A cancel requested
    while the video was being stored wins: the guard refuses to record it."""
    return _transition(
        session,
        job_id,
        and_(_owned(attempt), Job.cancel_requested.is_(False)),
        RUNNING,
        dict(
            status=SUCCEEDED,
            progress=100,
            output_key=output_key,
            output_bytes=output_bytes,
            output_sha256=output_sha256,
            stage_timings=stage_timings,
            finished_at=utcnow(),
        ),
        attempt,
    )


def fail(session: Session, job_id: str, attempt: int, code: str, message: str) -> bool:
    """running -> failed, for errors that another attempt would not fix."""
    return _transition(
        session,
        job_id,
        _owned(attempt),
        RUNNING,
        dict(status=FAILED, error_code=code, error_message=message[:4000], finished_at=utcnow()),
        attempt,
        detail=code,
    )


def retry_later(session: Session, job_id: str, attempt: int, code: str, message: str) -> bool:
    """running -> queued after a transient failure, or -> failed once attempts run out."""
    row = session.execute(select(Job.max_attempts).where(Job.id == job_id)).scalar()
    if row is not None and attempt >= row:
        return fail(session, job_id, attempt, code, f"{message} (after {attempt} attempts)")
    return _transition(
        session,
        job_id,
        _owned(attempt),
        RUNNING,
        dict(status=QUEUED, error_code=code, error_message=message[:4000], dispatched_at=None),
        attempt,
        detail=code,
    )


def finish_cancelled(session: Session, job_id: str, attempt: int) -> bool:
    """running -> cancelled, by the worker that saw the cancel request."""
    return _transition(
        session,
        job_id,
        _owned(attempt),
        RUNNING,
        dict(
            status=CANCELLED,
            error_code="cancelled",
            error_message="cancelled by request",
            finished_at=utcnow(),
        ),
        attempt,
    )


def attempt_status(session: Session, job_id: str, attempt: int) -> str | None:
    """The job's status while ``attempt`` is still its latest attempt, else None.

    A worker whose guarded UPDATE matched no row after a retried commit asks this: the
    earlier try may have committed (only the reply was lost), in which case the row shows
    the attempt's own outcome (``succeeded`` can only have been written by that attempt)."""
    row = session.execute(select(Job.status, Job.attempt).where(Job.id == job_id)).one_or_none()
    if row is None or row.attempt != attempt:
        return None
    return row.status


def cancel_if_requested(session: Session, job_id: str) -> bool:
    """queued -> cancelled for a job whose cancel was asked for while it ran and that went
    back to the queue (``retry_later``) before its worker saw the request: ``claim`` would
    never take it and the reaper never dispatch it. False if there is nothing to cancel."""
    row = session.execute(
        select(Job.status, Job.attempt, Job.cancel_requested).where(Job.id == job_id)
    ).one_or_none()
    if row is None or row.status != QUEUED or not row.cancel_requested:
        return False
    return _cancel_queued(session, job_id, row.attempt)


def _cancel_queued(session: Session, job_id: str, attempt: int) -> bool:
    """queued -> cancelled, guarded by the attempt the job was queued at."""
    return _transition(
        session,
        job_id,
        and_(Job.status == QUEUED, Job.attempt == attempt),
        QUEUED,
        dict(
            status=CANCELLED,
            cancel_requested=True,
            error_code="cancelled",
            error_message="cancelled by request",
            finished_at=utcnow(),
        ),
        attempt,
    )


def request_cancel(session: Session, job_id: str) -> str | None:
    """Cancel a queued job now, or flag a running one for its worker to stop.

    Returns the status the job is left in (``None`` if there is no such job).
    """
    row = session.execute(select(Job.status, Job.attempt).where(Job.id == job_id)).one_or_none()
    if row is None:
        return None
    if row.status == QUEUED:
        if _cancel_queued(session, job_id, row.attempt):
            return CANCELLED
        return request_cancel(session, job_id)  # it was claimed meanwhile: flag it instead
    if row.status == RUNNING:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == RUNNING)
            .values(cancel_requested=True, updated_at=utcnow())
        )
        return RUNNING
    return row.status


def mark_dispatched(session: Session, job_id: str) -> bool:
    return _transition(session, job_id, Job.status == QUEUED, None, dict(dispatched_at=utcnow()), 0)


def requeue_stale(session: Session, timeout_s: float, now: datetime | None = None) -> list[str]:
    """Reaper: running jobs whose worker stopped heart-beating go back to the queue (or fail,
    when that was their last attempt; or end cancelled, when a cancel was asked for: no
    worker would ever take a queued job with a cancel request). Returns the requeued ids."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=timeout_s)
    stale = session.execute(
        select(Job.id, Job.attempt, Job.max_attempts, Job.cancel_requested).where(
            Job.status == RUNNING, Job.heartbeat_at < cutoff
        )
    ).all()
    requeued = []
    for job_id, attempt, max_attempts, cancel_requested in stale:
        guard = and_(_owned(attempt), Job.heartbeat_at < cutoff)
        message = f"worker stopped heart-beating for {timeout_s:.0f}s during attempt {attempt}"
        if cancel_requested:
            _transition(
                session,
                job_id,
                guard,
                RUNNING,
                dict(
                    status=CANCELLED,
                    error_code="cancelled",
                    error_message=f"cancelled by request ({message})",
                    finished_at=now,
                ),
                attempt,
                detail="worker_lost",
            )
        elif attempt >= max_attempts:
            _transition(
                session,
                job_id,
                guard,
                RUNNING,
                dict(
                    status=FAILED,
                    error_code="worker_lost",
                    error_message=f"{message}; no attempts left",
                    finished_at=now,
                ),
                attempt,
                detail="worker_lost",
            )
        elif _transition(
            session,
            job_id,
            guard,
            RUNNING,
            dict(status=QUEUED, dispatched_at=None),
            attempt,
            detail="worker_lost",
        ):
            requeued.append(job_id)
    return requeued


def undispatched(session: Session, older_than_s: float, now: datetime | None = None) -> list[str]:
    """Queued jobs never dispatched, or dispatched so long ago the message must be lost."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=older_than_s)
    rows = session.execute(
        select(Job.id)
        .where(
            Job.status == QUEUED,
            Job.cancel_requested.is_(False),
            (Job.dispatched_at.is_(None)) | (Job.dispatched_at < cutoff),
        )
        .order_by(Job.priority.desc(), Job.created_at)
    ).scalars()
    return list(rows)
