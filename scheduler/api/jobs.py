"""What the video routes do to jobs: submit (idempotency, per-tenant admission, image upload,
insert), find, list, cancel, delete. Nothing here publishes: a job is a queued row, and the
scheduler releases it to the workers (``scheduler/release.py``), so a broker that is down
or hung never slows a submission. State changes go through :mod:`fvb_core.db.transitions`;
every function works in the request's session and commits what it writes."""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fvb_core.api_keys import Principal
from fvb_core.db import transitions
from fvb_core.db.models import Batch, Job, utcnow
from fvb_core.jobs import BatchStatus, JobParams, JobStatus
from fvb_core.storage import StorageUnavailable, input_image_key
from scheduler.api.context import ApiContext
from scheduler.api.errors import ApiError
from scheduler.api.pagination import keyset_page
from scheduler.api.validation import SEED_MAX, VideoRequest

log = logging.getLogger(__name__)

IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY_CHARS = 255
#: How far back the drain rate of a tenant is measured (its finished jobs).
DRAIN_WINDOW_S = 600
#: Bounds of the Retry-After a full tenant is told.
RETRY_AFTER_BOUNDS_S = (1, 3600)
#: Retry-After for a tenant whose jobs have not been finishing lately.
RETRY_AFTER_IDLE_S = 60


@dataclass(frozen=True)
class Submitted:
    job: Job
    #: False when an Idempotency-Key replay returned an existing job.
    created: bool


def _find_by_key(session: Session, tenant: str, key: str) -> Job | None:
    return session.execute(
        select(Job).where(Job.tenant == tenant, Job.idempotency_key == key)
    ).scalar_one_or_none()


def _replay(job: Job, request_hash: str) -> Submitted:
    if job.request_hash != request_hash:
        raise ApiError(
            409,
            f"{IDEMPOTENCY_HEADER} was already used for video '{job.id}' with a different "
            "request body; use a new key for a new request",
            param=IDEMPOTENCY_HEADER,
            code="idempotency_key_reused",
        )
    return Submitted(job, created=False)


def check_batch_open(session: Session, tenant: str, batch_id: str) -> int | None:
    """404 / 409 unless the tenant's batch takes videos; its retention (seconds or None)."""
    row = session.execute(
        select(Batch.status, Batch.retention_s).where(Batch.id == batch_id, Batch.tenant == tenant)
    ).one_or_none()
    if row is None:
        raise ApiError.not_found(f"No batch found with id '{batch_id}'", "batch_id")
    status, retention_s = row
    if status == BatchStatus.CANCELLED:
        raise ApiError(
            409,
            f"batch '{batch_id}' was cancelled; it takes no new videos",
            param="batch_id",
            code="batch_cancelled",
        )
    return retention_s


def drain_retry_after(session: Session, tenant: str, excess: int) -> int:
    """Seconds until ``excess`` of the tenant's jobs should have drained, at the rate its jobs
    finished over the last ``DRAIN_WINDOW_S`` (bounded)."""
    since = utcnow() - timedelta(seconds=DRAIN_WINDOW_S)
    finished = session.execute(
        select(func.count()).select_from(Job).where(Job.tenant == tenant, Job.finished_at >= since)
    ).scalar_one()
    if not finished:
        return RETRY_AFTER_IDLE_S
    low, high = RETRY_AFTER_BOUNDS_S
    return max(low, min(high, math.ceil(excess * DRAIN_WINDOW_S / finished)))


def admit(session: Session, context: ApiContext, principal: Principal, count: int) -> None:
    """429 unless the tenant has room for ``count`` more queued jobs (its key's limit, else
    ``max_queued_jobs``). One counter row is read, never the backlog; a batch that does not
    fit is refused whole."""
    limit = principal.max_queued or context.settings.max_queued_jobs
    queued = transitions.queued_of(session, principal.tenant)
    if queued + count <= limit:
        return
    wait = drain_retry_after(session, principal.tenant, queued + count - limit)
    room = "" if count == 1 else f", no room for {count} more"
    raise ApiError(
        429,
        f"Tenant '{principal.tenant}' has {queued} queued jobs (limit {limit}){room}; "
        f"retry in about {wait} s",
        code="queue_full",
        headers={"Retry-After": str(wait)},
    )


def admit_inserted(
    session: Session, context: ApiContext, principal: Principal, inserted: int
) -> None:
    """Like :func:`admit`, for ``inserted`` jobs already in this (uncommitted) transaction:
    their tenant's counter already counts them."""
    if inserted:
        limit = principal.max_queued or context.settings.max_queued_jobs
        queued = transitions.queued_of(session, principal.tenant)
        if queued > limit:
            before = queued - inserted
            wait = drain_retry_after(session, principal.tenant, queued - limit)
            raise ApiError(
                429,
                f"Tenant '{principal.tenant}' has {before} queued jobs (limit {limit}), no room "
                f"for {inserted} more; retry in about {wait} s",
                code="queue_full",
                headers={"Retry-After": str(wait)},
            )


def _upload_image(context: ApiContext, job_id: str, png: bytes) -> str:
    key = input_image_key(job_id)
    try:
        context.ensure_bucket()
        context.store.put_bytes(key, png, "image/png")
    except StorageUnavailable as err:
        log.warning("could not store the input image of %s: %s", job_id, err)
        raise ApiError(
            503,
            "storage is unavailable: could not store input_reference; retry later",
            code="storage_unavailable",
        ) from err
    return key


def submit(
    session: Session,
    context: ApiContext,
    principal: Principal,
    request: VideoRequest,
    idempotency_key: str | None,
) -> Submitted:
    """Admit, store the image, insert the job (queued): the scheduler takes it from there."""
    tenant = principal.tenant
    request_hash = request.request_hash()
    if idempotency_key is not None and (
        not idempotency_key or len(idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS
    ):
        raise ApiError.invalid(
            IDEMPOTENCY_HEADER,
            f"{IDEMPOTENCY_HEADER} must be 1..{MAX_IDEMPOTENCY_KEY_CHARS} characters",
        )
    if idempotency_key is not None:
        existing = _find_by_key(session, tenant, idempotency_key)
        if existing is not None:
            session.commit()
            return _replay(existing, request_hash)
    retention_s = None
    if request.batch_id is not None:
        retention_s = check_batch_open(session, tenant, request.batch_id)
    admit(session, context, principal, 1)
    session.commit()  # no transaction held while the image uploads

    job = new_job(context, tenant, request, idempotency_key, retention_s)
    try:
        transitions.create_job(session, job)
        session.commit()
    except IntegrityError:
        # Two requests with one Idempotency-Key raced; the other inserted first.
        session.rollback()
        if idempotency_key is None:
            raise
        existing = _find_by_key(session, tenant, idempotency_key)
        session.commit()
        if existing is None:
            raise
        if JobParams.from_json(job.params).input_image_key is not None:
            _forget_objects(context, job.id)
        return _replay(existing, request_hash)
    log.info("job %s queued for tenant %s (model %s)", job.id, tenant, job.model)
    return Submitted(job, created=True)


def new_job(
    context: ApiContext,
    tenant: str,
    request: VideoRequest,
    idempotency_key: str | None = None,
    retention_s: int | None = None,
) -> Job:
    """The row of a new queued job (not yet inserted), its input image already stored.
    ``retention_s``: its batch's retention; else the deployment's (``FVB_RETENTION_S``)."""
    job_id = transitions.new_job_id()
    image_key = _upload_image(context, job_id, request.image.png) if request.image else None
    seed = request.seed if request.seed is not None else secrets.randbelow(SEED_MAX + 1)
    params = request.job_params(seed, image_key)
    now = utcnow()
    return Job(
        id=job_id,
        tenant=tenant,
        model=request.model.name,
        pool=request.model.pool,
        work=params.work,
        params=params.to_json(),
        priority=request.priority,
        max_attempts=context.settings.job_max_attempts,
        idempotency_key=idempotency_key,
        request_hash=request.request_hash(),
        batch_id=request.batch_id,
        retention_s=retention_s or context.settings.retention_s,
        created_at=now,
        updated_at=now,
    )


def get(session: Session, tenant: str | None, job_id: str) -> Job:
    """The tenant's job, or 404 (also for another tenant's job and for deleted ones).
    ``tenant`` None: an operator's look, any tenant's job."""
    where = [Job.id == job_id, Job.deleted_at.is_(None)]
    if tenant is not None:
        where.append(Job.tenant == tenant)
    job = session.execute(select(Job).where(*where)).scalar_one_or_none()
    session.commit()
    if job is None:
        raise ApiError.not_found(f"No video found with id '{job_id}'", "video_id")
    return job


@dataclass(frozen=True)
class Page:
    jobs: list[Job]
    has_more: bool


def list_page(
    session: Session,
    tenant: str,
    *,
    after: str | None,
    limit: int,
    descending: bool,
    statuses: tuple[str, ...] | None,
    batch_id: str | None,
) -> Page:
    """One page of the tenant's jobs ordered by (created_at, id), after the cursor job."""
    query = select(Job).where(Job.tenant == tenant, Job.deleted_at.is_(None))
    if statuses:
        query = query.where(Job.status.in_(statuses))
    if batch_id is not None:
        query = query.where(Job.batch_id == batch_id)
    jobs, has_more = keyset_page(
        session,
        query,
        Job,
        tenant=tenant,
        after=after,
        limit=limit,
        descending=descending,
        noun="video",
    )
    session.commit()
    return Page(jobs=jobs, has_more=has_more)


def cancel(session: Session, tenant: str | None, job_id: str) -> Job:
    """Queued: cancelled now. Running: flagged, the worker stops at its next step. Final: as is.
    ``tenant`` None: an operator's cancel, any tenant's job."""
    get(session, tenant, job_id)
    left_in = transitions.request_cancel(session, job_id)
    session.commit()
    log.info("cancel requested for %s: now %s", job_id, left_in)
    return get(session, tenant, job_id)


def _forget_objects(context: ApiContext, job_id: str) -> list[str]:
    if not context.try_ensure_bucket():
        raise StorageUnavailable("storage is unavailable")
    return context.store.delete_job(job_id)


def delete(session: Session, context: ApiContext, tenant: str | None, job_id: str) -> None:
    """Cancel if unfinished, delete its stored objects, then hide the job (``deleted_at``).
    ``tenant`` None: an operator's delete, any tenant's job."""
    job = get(session, tenant, job_id)
    if not JobStatus(job.status).is_final:
        transitions.request_cancel(session, job_id)
        session.commit()
    try:
        keys = _forget_objects(context, job_id)
    except StorageUnavailable as err:
        log.warning("could not delete the objects of %s: %s", job_id, err)
        raise ApiError(
            503,
            "storage is unavailable: the video's files could not be deleted; retry the delete",
            code="storage_unavailable",
        ) from err
    transitions.hide(session, job_id, tenant)
    session.commit()
    log.info("deleted %s (%d stored objects)", job_id, len(keys))
