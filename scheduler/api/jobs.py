"""What the video routes do to jobs: submit (idempotency, admission, image upload, insert,
dispatch), find, list, cancel, delete. State changes go through
:mod:`fvb_core.db.transitions`; the routes stay thin and this module never sees HTTP."""

from __future__ import annotations

import io
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fvb_core.db import transitions
from fvb_core.db.models import Batch, Job, utcnow
from fvb_core.db.session import session_scope
from fvb_core.jobs import BatchStatus, JobParams, JobStatus
from fvb_core.storage import StorageUnavailable
from scheduler.api.context import ApiContext
from scheduler.api.errors import ApiError
from scheduler.api.images import input_image_key
from scheduler.api.pagination import keyset_page
from scheduler.api.validation import SEED_MAX, VideoRequest
from scheduler.dispatch import dispatch

log = logging.getLogger(__name__)

IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY_CHARS = 255
#: What a 429 tells the client to wait: long enough for a few jobs to drain.
RETRY_AFTER_S = 30
#: How long a submission waits for the broker to take its message. A broker that refuses
#: connections fails fast; one that hangs (paused, partitioned) would block the publish
#: indefinitely, so past this the request answers and the publish finishes on its own or
#: the reaper re-sends the job.
DISPATCH_WAIT_S = 5.0
_dispatcher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dispatch")


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


def _admit(session: Session, context: ApiContext, tenant: str, request: VideoRequest) -> None:
    if request.batch_id is not None:
        status = session.execute(
            select(Batch.status).where(Batch.id == request.batch_id, Batch.tenant == tenant)
        ).scalar_one_or_none()
        if status is None:
            raise ApiError.not_found(f"No batch found with id '{request.batch_id}'", "batch_id")
        if status == BatchStatus.CANCELLED:
            raise ApiError(
                409,
                f"batch '{request.batch_id}' was cancelled; it takes no new videos",
                param="batch_id",
                code="batch_cancelled",
            )
    admit_count(session, context, 1)


def admit_count(session: Session, context: ApiContext, count: int) -> None:
    """429 unless the queue has room for ``count`` more jobs."""
    queued = session.execute(
        select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED)
    ).scalar_one()
    limit = context.settings.max_queued_jobs
    if queued + count > limit:
        room = "" if count == 1 else f", no room for {count} more"
        raise ApiError(
            429,
            f"The service has {queued} queued jobs (limit {limit}){room}; retry later",
            code="queue_full",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )


def _upload_image(context: ApiContext, job_id: str, png: bytes) -> str:
    key = input_image_key(job_id)
    try:
        context.ensure_bucket()
        context.store.client.put_object(
            Bucket=context.store.bucket, Key=key, Body=io.BytesIO(png), ContentType="image/png"
        )
    except (StorageUnavailable, BotoCoreError, ClientError) as err:
        log.warning("could not store the input image of %s: %s", job_id, err)
        raise ApiError(
            503,
            "storage is unavailable: could not store input_reference; retry later",
            code="storage_unavailable",
        ) from err
    return key


def submit(
    context: ApiContext, tenant: str, request: VideoRequest, idempotency_key: str | None
) -> Submitted:
    """Admit, store the image, insert the job (queued), then dispatch it.

    A failed dispatch leaves the job queued with ``dispatched_at`` NULL: the reaper sends it.
    """
    settings = context.settings
    request_hash = request.request_hash()
    if idempotency_key is not None and (
        not idempotency_key or len(idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS
    ):
        raise ApiError.invalid(
            IDEMPOTENCY_HEADER,
            f"{IDEMPOTENCY_HEADER} must be 1..{MAX_IDEMPOTENCY_KEY_CHARS} characters",
        )
    with session_scope(settings.database_url) as session:
        if idempotency_key is not None:
            existing = _find_by_key(session, tenant, idempotency_key)
            if existing is not None:
                return _replay(existing, request_hash)
        _admit(session, context, tenant, request)

    job = new_job(context, tenant, request, idempotency_key)
    job_id = job.id
    image_key = JobParams.from_json(job.params).input_image_key
    try:
        with session_scope(settings.database_url) as session:
            transitions.create_job(session, job)
    except IntegrityError:
        # Two requests with one Idempotency-Key raced; the other inserted first.
        if idempotency_key is None:
            raise
        with session_scope(settings.database_url) as session:
            existing = _find_by_key(session, tenant, idempotency_key)
        if existing is None:
            raise
        if image_key is not None:
            _forget_objects(context, job_id)
        return _replay(existing, request_hash)

    _dispatch(context, job.id, request.model.pool, request.priority)
    return Submitted(get(context, tenant, job.id), created=True)


def new_job(
    context: ApiContext, tenant: str, request: VideoRequest, idempotency_key: str | None = None
) -> Job:
    """The row of a new queued job (not yet inserted), its input image already stored."""
    job_id = transitions.new_job_id()
    image_key = _upload_image(context, job_id, request.image.png) if request.image else None
    seed = request.seed if request.seed is not None else secrets.randbelow(SEED_MAX + 1)
    now = utcnow()
    return Job(
        id=job_id,
        tenant=tenant,
        model=request.model.name,
        params=request.job_params(seed, image_key).to_json(),
        priority=request.priority,
        max_attempts=context.settings.job_max_attempts,
        idempotency_key=idempotency_key,
        request_hash=request.request_hash(),
        batch_id=request.batch_id,
        created_at=now,
        updated_at=now,
    )


def dispatch_job(context: ApiContext, job: Job, pool: str) -> None:
    _dispatch(context, job.id, pool, job.priority)


def _dispatch(context: ApiContext, job_id: str, pool: str, priority: int) -> None:
    """Publish the job's message; never fail the request over it (the job is committed)."""
    future = _dispatcher.submit(dispatch, context.settings, job_id, pool, priority)
    try:
        future.result(timeout=DISPATCH_WAIT_S)
    except FutureTimeout:
        log.warning(
            "dispatch of %s still waiting on the broker after %.0fs; answering without it",
            job_id,
            DISPATCH_WAIT_S,
        )
    except Exception as err:  # broker down: the reaper re-sends undispatched jobs
        log.warning("dispatch of %s failed, left for the reaper: %s", job_id, err)


def get(context: ApiContext, tenant: str, job_id: str) -> Job:
    """The tenant's job, or 404 (also for another tenant's job and for deleted ones)."""
    with session_scope(context.settings.database_url) as session:
        job = session.execute(
            select(Job).where(Job.id == job_id, Job.tenant == tenant, Job.deleted_at.is_(None))
        ).scalar_one_or_none()
    if job is None:
        raise ApiError.not_found(f"No video found with id '{job_id}'", "video_id")
    return job


@dataclass(frozen=True)
class Page:
    jobs: list[Job]
    has_more: bool


def list_page(
    context: ApiContext,
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
    with session_scope(context.settings.database_url) as session:
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
    return Page(jobs=jobs, has_more=has_more)


def cancel(context: ApiContext, tenant: str, job_id: str) -> Job:
    """Queued: cancelled now. Running: flagged, the worker stops at its next step. Final: as is."""
    get(context, tenant, job_id)
    with session_scope(context.settings.database_url) as session:
        left_in = transitions.request_cancel(session, job_id)
    log.info("cancel requested for %s: now %s", job_id, left_in)
    return get(context, tenant, job_id)


def _forget_objects(context: ApiContext, job_id: str) -> list[str]:
    if not context.try_ensure_bucket():
        raise StorageUnavailable("storage is unavailable")
    keys = [
        *context.store.list_keys(f"videos/{job_id}/"),
        *context.store.list_keys(f"inputs/{job_id}/"),
    ]
    context.store.delete(*keys)
    return keys


def delete(context: ApiContext, tenant: str, job_id: str) -> None:
    """Cancel if unfinished, delete its stored objects, then hide the job (``deleted_at``)."""
    job = get(context, tenant, job_id)
    if not JobStatus(job.status).is_final:
        with session_scope(context.settings.database_url) as session:
            transitions.request_cancel(session, job_id)
    try:
        keys = _forget_objects(context, job_id)
    except StorageUnavailable as err:
        log.warning("could not delete the objects of %s: %s", job_id, err)
        raise ApiError(
            503,
            "storage is unavailable: the video's files could not be deleted; retry the delete",
            code="storage_unavailable",
        ) from err
    with session_scope(context.settings.database_url) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.deleted_at.is_(None))
            .values(deleted_at=utcnow(), updated_at=utcnow())
        )
    log.info("deleted %s (%d stored objects)", job_id, len(keys))
