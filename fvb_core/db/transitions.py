"""The job state machine. Every state write is one guarded statement that decides and writes
at once, plus its audit events.

``queued -> running -> succeeded | failed | cancelled``, and ``running -> queued`` on a retry.
A worker's writes name the attempt it claimed (``WHERE id = ? AND status = 'running' AND
attempt = ?``), so a redelivered or stale worker matches no row and changes nothing: the
attempt number is the fence. Where the outcome depends on the row (a retry on the last
attempt fails instead; a cancel of a queued job ends it, of a running one flags it), the
decision is a ``CASE`` in the same ``UPDATE ... RETURNING``: nothing is read, decided in
Python, then written. A transition that matched no row returns False (or None) and writes
no event.

Each transition that moves a job into or out of ``queued`` also moves its tenant's counter
(``tenant_counters``) in the same transaction, so admission never counts a backlog. Each one
that ends a job calls ``outbox.job_finished`` in the same transaction: the webhooks' events.
``dispatched_at`` is the scheduler's mark: set when it released the job to its pool's
queue, cleared when the job goes back to waiting. Callers commit the session.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Interval,
    String,
    and_,
    case,
    cast,
    func,
    insert,
    literal,
    literal_column,
    select,
    type_coerce,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from fvb_core.db import outbox
from fvb_core.db.models import Job, JobEvent, TenantCounter, UTCDateTime, utcnow
from fvb_core.jobs import JobStatus

QUEUED, RUNNING = JobStatus.QUEUED.value, JobStatus.RUNNING.value
SUCCEEDED, FAILED, CANCELLED = (
    JobStatus.SUCCEEDED.value,
    JobStatus.FAILED.value,
    JobStatus.CANCELLED.value,
)
CANCEL_MESSAGE = "cancelled by request"
#: The detail of the event that records a release (no state change: queued -> queued).
RELEASED = "released"


def new_job_id() -> str:
    return f"video_{secrets.token_hex(12)}"


# -- bookkeeping shared by the transitions ---------------------------------------------------


def _events(session: Session, rows: Iterable[dict[str, Any]]) -> None:
    rows = list(rows)
    if rows:
        session.execute(insert(JobEvent), rows)


def _event(job_id: str, at: datetime, frm: str | None, to: str, attempt: int, detail=None):
    return dict(job_id=job_id, at=at, from_status=frm, to_status=to, attempt=attempt, detail=detail)


def count_queued(session: Session, deltas: Counter[str]) -> None:
    """Add ``deltas[tenant]`` to each tenant's queued counter (an upsert, tenants in sorted
    order so two transactions never wait on each other's rows in opposite orders)."""
    dialect = session.get_bind().dialect.name
    upsert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}[dialect]
    for tenant in sorted(t for t, d in deltas.items() if d):
        statement = upsert(TenantCounter).values(tenant=tenant, queued=deltas[tenant])
        session.execute(
            statement.on_conflict_do_update(
                index_elements=[TenantCounter.tenant],
                set_={"queued": TenantCounter.queued + deltas[tenant]},
            )
        )


def queued_of(session: Session, tenant: str) -> int:
    """The tenant's queued jobs, from its counter."""
    value = session.execute(
        select(TenantCounter.queued).where(TenantCounter.tenant == tenant)
    ).scalar()
    return int(value or 0)


def _state(column: Any) -> ColumnElement:
    """``column`` as a guard only: ``status || ''`` cannot use an index, so a statement that
    finds its rows by primary key or batch (``id IN (...)``, ``batch_id = ?``) is not
    planned as a walk over every queued row of the status index (SQLite does that for an
    IN list of a few dozen ids once the queue is large)."""
    return column + literal("")


def _owned(attempt: int) -> ColumnElement[bool]:
    return and_(Job.status == RUNNING, Job.attempt == attempt)


def _guarded(
    session: Session,
    job_id: str,
    guard: ColumnElement[bool],
    from_status: str,
    values: dict[str, Any],
    attempt: int,
    detail: str | None = None,
) -> bool:
    """One row from ``from_status`` to ``values["status"]`` when ``guard`` holds."""
    now = utcnow()
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, guard)
        .values(updated_at=now, **values)
        .returning(Job.tenant)
    ).one_or_none()
    if row is None:
        return False
    _events(session, [_event(job_id, now, from_status, values["status"], attempt, detail)])
    if values["status"] in (SUCCEEDED, FAILED, CANCELLED):
        outbox.job_finished(session, [(job_id, row.tenant)])
    return True


# -- creation and the claim ------------------------------------------------------------------


def _as_new(job: Job) -> None:
    """A job about to be inserted: queued, attempt 0, not released yet."""
    job.id = job.id or new_job_id()
    job.status = QUEUED
    job.attempt = 0
    job.dispatched_at = None
    job.created_at = job.created_at or utcnow()


def create_job(session: Session, job: Job) -> Job:
    return create_jobs(session, [job])[0]


def create_jobs(session: Session, jobs: Sequence[Job]) -> Sequence[Job]:
    """Insert queued jobs (waiting for the scheduler to release them) with their events."""
    for job in jobs:
        _as_new(job)
    session.add_all(jobs)
    session.flush()
    _events(session, (_event(job.id, job.created_at, None, QUEUED, 0) for job in jobs))
    count_queued(session, Counter(job.tenant for job in jobs))
    return jobs


def create_new_jobs(session: Session, jobs: Sequence[Job]) -> list[Job]:
    """Insert the jobs whose (tenant, idempotency key) is not taken yet; the ones inserted.

    The unique index decides (``INSERT ... ON CONFLICT DO NOTHING RETURNING``), in one
    statement: no lookup first, so the cost per job does not depend on what the planner
    believes about the table's size (a resumed upload sends keys that exist; a first one
    does not)."""
    if not jobs:
        return []
    columns = [c.key for c in Job.__table__.columns]
    for job in jobs:
        _as_new(job)
        job.updated_at = job.updated_at or job.created_at
    defaults = {c.key: c.default.arg for c in Job.__table__.columns if c.default is not None}
    rows = [
        {
            name: (
                getattr(job, name)
                if getattr(job, name) is not None
                else (None if callable(defaults.get(name)) else defaults.get(name))
            )
            for name in columns
        }
        for job in jobs
    ]
    dialect = session.get_bind().dialect.name
    upsert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}[dialect]
    statement = (
        upsert(Job)
        .on_conflict_do_nothing(index_elements=[Job.tenant, Job.idempotency_key])
        .returning(Job.id)
    )
    # Many rows through SQLAlchemy's insertmanyvalues: batched under SQLite's variable limit.
    inserted = set(session.execute(statement, rows).scalars())
    new = [job for job in jobs if job.id in inserted]
    _events(session, (_event(job.id, job.created_at, None, QUEUED, 0) for job in new))
    count_queued(session, Counter(job.tenant for job in new))
    return new


@dataclass(frozen=True)
class Claim:
    job_id: str
    attempt: int
    params: dict[str, Any]
    model: str


def claim(session: Session, job_id: str, worker_id: str) -> Claim | None:
    """queued -> running as attempt n+1, or None when the job is not there to take."""
    now = utcnow()
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == QUEUED, Job.cancel_requested.is_(False))
        .values(
            status=RUNNING,
            attempt=Job.attempt + 1,
            worker_id=worker_id,
            started_at=now,
            heartbeat_at=now,
            updated_at=now,
            progress=0,
            error_code=None,
            error_message=None,
        )
        .returning(Job.attempt, Job.params, Job.model, Job.tenant)
    ).one_or_none()
    if row is None:
        return None
    _events(session, [_event(job_id, now, QUEUED, RUNNING, row.attempt, f"worker {worker_id}")])
    count_queued(session, Counter({row.tenant: -1}))
    return Claim(job_id, row.attempt, row.params, row.model)


# -- the running attempt ---------------------------------------------------------------------


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
    cancel = session.execute(
        update(Job)
        .where(Job.id == job_id, _owned(attempt))
        .values(**values)
        .returning(Job.cancel_requested)
    ).scalar_one_or_none()
    return Heartbeat(still_owner=cancel is not None, cancel_requested=bool(cancel))


def ownership(session: Session, job_id: str, attempt: int) -> Heartbeat:
    """The same answer as :func:`heartbeat`, read only (the per-step check between beats)."""
    cancel = session.execute(
        select(Job.cancel_requested).where(Job.id == job_id, _owned(attempt))
    ).scalar_one_or_none()
    return Heartbeat(still_owner=cancel is not None, cancel_requested=bool(cancel))


def expiry_after(session: Session, moment: datetime) -> ColumnElement:
    """SET value: ``moment`` + the row's ``retention_s`` seconds, computed by the database in
    the statement that writes it (NULL when the job has no retention: kept until deleted)."""
    if session.get_bind().dialect.name == "sqlite":
        # SQLite keeps UTC as text ('YYYY-MM-DD HH:MM:SS.ffffff'); %f gives milliseconds.
        start = moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        later = func.strftime(
            "%Y-%m-%d %H:%M:%f", start, literal("+") + cast(Job.retention_s, String) + " seconds"
        )
        return type_coerce(later + literal("000"), UTCDateTime())
    second = literal_column("INTERVAL '1 second'", Interval())
    return type_coerce(literal(moment, UTCDateTime()) + Job.retention_s * second, UTCDateTime())


def succeed(
    session: Session,
    job_id: str,
    attempt: int,
    output_key: str,
    output_bytes: int,
    output_sha256: str,
    stage_timings: dict[str, float] | None = None,
    result: dict[str, Any] | None = None,
) -> bool:
    """running -> succeeded, recording the output in the same statement. A cancel requested
    while the video was being stored wins: the guard refuses to record it. ``expires_at``
    (when the sweeper deletes its objects) is set from the row's ``retention_s``."""
    finished = utcnow()
    return _guarded(
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
            result=result,  # the worker's JobResult.to_json()
            finished_at=finished,
            expires_at=expiry_after(session, finished),
        ),
        attempt,
    )


def fail(session: Session, job_id: str, attempt: int, code: str, message: str) -> bool:
    """running -> failed, for errors that another attempt would not fix."""
    return _guarded(
        session,
        job_id,
        _owned(attempt),
        RUNNING,
        dict(status=FAILED, error_code=code, error_message=message[:4000], finished_at=utcnow()),
        attempt,
        detail=code,
    )


def finish_cancelled(session: Session, job_id: str, attempt: int) -> bool:
    """running -> cancelled, by the worker that saw the cancel request."""
    return _guarded(
        session,
        job_id,
        _owned(attempt),
        RUNNING,
        dict(
            status=CANCELLED,
            error_code="cancelled",
            error_message=CANCEL_MESSAGE,
            finished_at=utcnow(),
        ),
        attempt,
    )


def _back_or_out(
    message: str, now: datetime, detail_code: str, last_message: Any = None
) -> dict[str, Any]:
    """SET values for running jobs leaving their attempt: cancelled when a cancel was asked
    for (no worker would take a queued job with one), failed on the last attempt, queued
    (waiting to be released again) otherwise."""
    status = case(
        (Job.cancel_requested.is_(True), literal(CANCELLED)),
        (Job.attempt >= Job.max_attempts, literal(FAILED)),
        else_=literal(QUEUED),
    )
    return dict(
        status=status,
        error_code=case(
            (Job.cancel_requested.is_(True), literal("cancelled")), else_=literal(detail_code)
        ),
        error_message=case(
            (Job.cancel_requested.is_(True), literal(f"{CANCEL_MESSAGE} ({message})"[:4000])),
            (
                Job.attempt >= Job.max_attempts,
                last_message
                if last_message is not None
                else literal(f"{message}; no attempts left"[:4000]),
            ),
            else_=literal(message[:4000]),
        ),
        finished_at=case(
            (Job.cancel_requested.is_(True), now),
            (Job.attempt >= Job.max_attempts, now),
            else_=None,
        ),
        dispatched_at=None,
        updated_at=now,
    )


def retry_later(session: Session, job_id: str, attempt: int, code: str, message: str) -> bool:
    """running -> queued after a transient failure; -> failed once attempts run out;
    -> cancelled if a cancel came in meanwhile. One statement decides."""
    now = utcnow()
    last = literal(f"{message} (after {attempt} attempts)"[:4000])
    values = _back_or_out(message, now, code, last)
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, _owned(attempt))
        .values(**values)
        .returning(Job.status, Job.tenant)
    ).one_or_none()
    if row is None:
        return False
    detail = "cancelled" if row.status == CANCELLED else code
    _events(session, [_event(job_id, now, RUNNING, row.status, attempt, detail)])
    if row.status == QUEUED:
        count_queued(session, Counter({row.tenant: 1}))
    else:
        outbox.job_finished(session, [(job_id, row.tenant)])
    return True


def requeue_stale(session: Session, timeout_s: float, now: datetime | None = None) -> list[str]:
    """Reaper: every running job whose worker stopped heart-beating, in one statement: back
    to the queue, or failed on its last attempt, or cancelled when a cancel was asked for.
    Returns the requeued ids."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=timeout_s)
    message = f"worker stopped heart-beating for {timeout_s:.0f}s"
    # The attempt that went silent, named in each row's message (one statement for all).
    during = literal(f"{message} during attempt ") + cast(Job.attempt, String)
    values = _back_or_out(message, now, "worker_lost", during + literal("; no attempts left"))
    values["error_message"] = case(
        (Job.cancel_requested.is_(True), literal(f"{CANCEL_MESSAGE} (") + during + literal(")")),
        (Job.attempt >= Job.max_attempts, during + literal("; no attempts left")),
        else_=during,
    )
    rows = session.execute(
        update(Job)
        .where(Job.status == RUNNING, Job.heartbeat_at < cutoff)
        .values(**values)
        .returning(Job.id, Job.status, Job.attempt, Job.tenant)
    ).all()
    _events(session, (_event(r.id, now, RUNNING, r.status, r.attempt, "worker_lost") for r in rows))
    count_queued(session, Counter(r.tenant for r in rows if r.status == QUEUED))
    outbox.job_finished(session, ((r.id, r.tenant) for r in rows if r.status != QUEUED))
    return sorted(r.id for r in rows if r.status == QUEUED)


# -- reads the worker needs ------------------------------------------------------------------


def attempt_status(session: Session, job_id: str, attempt: int) -> str | None:
    """The job's status while ``attempt`` is still its latest attempt, else None.

    A worker whose guarded UPDATE matched no row after a retried commit asks this: the
    earlier try may have committed (only the reply was lost), in which case the row shows
    the attempt's own outcome (``succeeded`` can only have been written by that attempt)."""
    return session.execute(
        select(Job.status).where(Job.id == job_id, Job.attempt == attempt)
    ).scalar_one_or_none()


# -- cancels ---------------------------------------------------------------------------------


def _cancel(session: Session, where: ColumnElement[bool]) -> list[Any]:
    """Queued jobs matching ``where`` end cancelled now, running ones are flagged for their
    worker: one statement. Returns (id, status, attempt, tenant) of every row it touched."""
    now = utcnow()
    queued = Job.status == QUEUED
    rows = session.execute(
        update(Job)
        .where(where, _state(Job.status).in_((QUEUED, RUNNING)))
        .values(
            cancel_requested=True,
            status=case((queued, literal(CANCELLED)), else_=Job.status),
            error_code=case((queued, literal("cancelled")), else_=Job.error_code),
            error_message=case((queued, literal(CANCEL_MESSAGE)), else_=Job.error_message),
            finished_at=case((queued, now), else_=Job.finished_at),
            updated_at=now,
        )
        .returning(Job.id, Job.status, Job.attempt, Job.tenant)
    ).all()
    ended = [r for r in rows if r.status == CANCELLED]
    _events(session, (_event(r.id, now, QUEUED, CANCELLED, r.attempt) for r in ended))
    count_queued(session, Counter({t: -n for t, n in Counter(r.tenant for r in ended).items()}))
    outbox.job_finished(session, ((r.id, r.tenant) for r in ended))
    return rows


def request_cancel(session: Session, job_id: str) -> str | None:
    """Cancel a queued job now, or flag a running one for its worker to stop.

    Returns the status the job is left in (``None`` if there is no such job).
    """
    rows = _cancel(session, Job.id == job_id)
    if rows:
        return rows[0].status
    return session.execute(select(Job.status).where(Job.id == job_id)).scalar_one_or_none()


def cancel_batch(session: Session, batch_id: str) -> int:
    """Cancel every unfinished video of the batch (one statement); how many it touched."""
    return len(_cancel(session, Job.batch_id == batch_id))


def cancel_if_requested(session: Session, job_id: str) -> bool:
    """queued -> cancelled for a queued job that carries a cancel request (one that went back
    to the queue before its worker saw the request: no one would ever take it)."""
    now = utcnow()
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == QUEUED, Job.cancel_requested.is_(True))
        .values(
            status=CANCELLED,
            error_code="cancelled",
            error_message=CANCEL_MESSAGE,
            finished_at=now,
            updated_at=now,
        )
        .returning(Job.attempt, Job.tenant)
    ).one_or_none()
    if row is None:
        return False
    _events(session, [_event(job_id, now, QUEUED, CANCELLED, row.attempt)])
    count_queued(session, Counter({row.tenant: -1}))
    outbox.job_finished(session, [(job_id, row.tenant)])
    return True


#: The detail of the event that records a deletion (status -> same status).
DELETED = "deleted"


def hide(session: Session, job_id: str, tenant: str | None) -> bool:
    """Mark the job deleted (its objects are gone): it leaves every list and count
    (``tenant`` None: an operator's delete, any tenant's job)."""
    now = utcnow()
    where = [Job.id == job_id, Job.deleted_at.is_(None)]
    if tenant is not None:
        where.append(Job.tenant == tenant)
    row = session.execute(
        update(Job)
        .where(*where)
        .values(deleted_at=now, updated_at=now)
        .returning(Job.id, Job.status, Job.attempt)
    ).one_or_none()
    if row is None:
        return False
    _events(session, [_event(row.id, now, row.status, row.status, row.attempt, DELETED)])
    return True


# -- the scheduler's marks -------------------------------------------------------------------


def release(session: Session, job_ids: Sequence[str], queue: str) -> list[str]:
    """Mark waiting jobs as released to ``queue`` (one statement); the ids it marked. A job
    cancelled, claimed or released by someone else meanwhile is left out."""
    if not job_ids:
        return []
    now = utcnow()
    rows = session.execute(
        update(Job)
        .where(
            Job.id.in_(job_ids),
            _state(Job.status) == QUEUED,
            Job.dispatched_at.is_(None),
            Job.cancel_requested.is_(False),
        )
        .values(dispatched_at=now, updated_at=now)
        .returning(Job.id, Job.attempt)
    ).all()
    detail = f"{RELEASED} to {queue}"
    _events(session, (_event(r.id, now, QUEUED, QUEUED, r.attempt, detail) for r in rows))
    return [r.id for r in rows]


def unrelease(session: Session, job_ids: Sequence[str], why: str) -> list[str]:
    """Released jobs whose message is gone (broker wiped, publish failed) wait again."""
    if not job_ids:
        return []
    now = utcnow()
    rows = session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), _state(Job.status) == QUEUED, Job.dispatched_at.is_not(None))
        .values(dispatched_at=None, updated_at=now)
        .returning(Job.id, Job.attempt)
    ).all()
    _events(session, (_event(r.id, now, QUEUED, QUEUED, r.attempt, why) for r in rows))
    return [r.id for r in rows]


#: The detail of the event that records the sweeper's deletion (succeeded -> succeeded).
EXPIRED = "expired"


def mark_expired(session: Session, job_ids: Sequence[str], now: datetime) -> list[str]:
    """The sweeper deleted these videos' objects: mark them expired (one statement, only
    rows past their expiry and not marked yet, so concurrent sweepers mark each once)."""
    if not job_ids:
        return []
    rows = session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.expired_at.is_(None), Job.expires_at <= now)
        .values(expired_at=now, updated_at=now)
        .returning(Job.id, Job.status, Job.attempt)
    ).all()
    _events(session, (_event(r.id, now, r.status, r.status, r.attempt, EXPIRED) for r in rows))
    return sorted(r.id for r in rows)


def recount_queued(session: Session) -> None:
    """Set every tenant's counter from the jobs table (after an upgrade, or by an operator
    who suspects drift): one GROUP BY, not for the request path."""
    counts = dict(
        session.execute(
            select(Job.tenant, func.count()).where(Job.status == QUEUED).group_by(Job.tenant)
        ).all()
    )
    session.execute(update(TenantCounter).values(queued=0))
    count_queued(session, Counter(counts))


# -- retries asked for by the tenant ---------------------------------------------------------


def _requeue_finished(
    session: Session, from_status: str, where: list[ColumnElement[bool]], more_attempts: int
) -> list[Any]:
    """``from_status`` (failed or cancelled) -> queued for the rows ``where`` matches, each
    with ``more_attempts`` attempts beyond the ones it used: the same row, so its id and item
    key stay; one statement, its events and the tenants' counters. (id, attempt, tenant)."""
    now = utcnow()
    rows = session.execute(
        update(Job)
        .where(*where, _state(Job.status) == from_status, Job.deleted_at.is_(None))
        .values(
            status=QUEUED,
            max_attempts=Job.attempt + more_attempts,
            cancel_requested=False,
            error_code=None,
            error_message=None,
            progress=0,
            started_at=None,
            heartbeat_at=None,
            finished_at=None,
            dispatched_at=None,
            worker_id=None,
            updated_at=now,
        )
        .returning(Job.id, Job.attempt, Job.tenant)
    ).all()
    _events(session, (_event(r.id, now, from_status, QUEUED, r.attempt, "retry") for r in rows))
    count_queued(session, Counter(r.tenant for r in rows))
    return rows


def retry_failed(
    session: Session, batch_id: str, code: str | None, more_attempts: int
) -> list[str]:
    """failed -> queued for the batch's failed videos (only those that failed with ``code``
    when given), each with ``more_attempts`` more attempts. Returns their ids."""
    where = [Job.batch_id == batch_id]
    if code is not None:
        where.append(Job.error_code == code)
    return sorted(r.id for r in _requeue_finished(session, FAILED, where, more_attempts))


def retry_job(session: Session, job_id: str, tenant: str | None, more_attempts: int) -> bool:
    """A failed or cancelled job queued again as a new attempt of the same video (an
    operator's or its tenant's retry; ``tenant`` None: any tenant's). False when the job is
    not failed or cancelled (or not the tenant's)."""
    where = [Job.id == job_id] + ([Job.tenant == tenant] if tenant is not None else [])
    return any(_requeue_finished(session, s, where, more_attempts) for s in (FAILED, CANCELLED))


def count_failed(session: Session, batch_id: str, code: str | None) -> int:
    where = [Job.batch_id == batch_id, Job.status == FAILED, Job.deleted_at.is_(None)]
    if code is not None:
        where.append(Job.error_code == code)
    return session.execute(select(func.count()).select_from(Job).where(*where)).scalar_one()
