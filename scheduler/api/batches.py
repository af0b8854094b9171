"""What the batch routes do: create a batch (optionally with its videos, all or none), count
its videos by status, cancel every unfinished one. A batch is a tenant's named group of jobs;
videos join it at creation or later through ``POST /v1/videos`` with ``batch_id``."""

from __future__ import annotations

import dataclasses
import logging
import re
import secrets
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fvb_core.api_keys import Principal
from fvb_core.db import transitions
from fvb_core.db.models import Batch, Job, utcnow
from fvb_core.jobs import UNFINISHED_STATUSES, BatchStatus, JobParams, JobStatus
from fvb_core.storage import StorageUnavailable
from scheduler.api import jobs
from scheduler.api.context import ApiContext
from scheduler.api.errors import ApiError
from scheduler.api.pagination import keyset_page
from scheduler.api.validation import BATCH_DEFAULT_PRIORITY, validate_create

log = logging.getLogger(__name__)

#: Videos one POST /v1/batches may carry; larger datasets add videos with batch_id
#: (``fvb submit`` does).
MAX_BATCH_REQUESTS = 1000
MAX_METADATA_ITEMS = 16
_UNFINISHED = tuple(UNFINISHED_STATUSES)


#: The fields of a POST /v1/batches body.
BATCH_FIELDS = ("metadata", "name", "requests", "retention_seconds")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
#: The longest retention a batch may ask for (ten years).
MAX_RETENTION_S = 10 * 365 * 86400


def check_name(value: Any) -> str | None:
    """A batch name: 1..128 of letters, digits, ``._:-``, starting with a letter or digit."""
    if value is None:
        return None
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ApiError.invalid(
            "name",
            "name must be 1..128 letters, digits or ._:- characters, starting with a letter "
            "or digit",
        )
    return value


def _retention(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RETENTION_S:
        raise ApiError.invalid(
            "retention_seconds",
            f"retention_seconds must be a whole number of seconds, 1..{MAX_RETENTION_S}",
        )
    return value


def _name_free(session: Session, tenant: str, name: str) -> None:
    taken = session.execute(
        select(Batch.id).where(Batch.tenant == tenant, Batch.name == name)
    ).scalar_one_or_none()
    if taken is not None:
        session.commit()
        raise ApiError(
            409,
            f"a batch named '{name}' exists already: '{taken}' (add videos to it with "
            f"POST /v1/batches/{taken}/videos)",
            param="name",
            code="batch_name_taken",
        )


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(12)}"


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or len(value) > MAX_METADATA_ITEMS
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    ):
        raise ApiError.invalid(
            "metadata", f"metadata must be an object of at most {MAX_METADATA_ITEMS} strings"
        )
    return value


def _requests(context: ApiContext, value: Any) -> list:
    """Validate every request before anything is stored; errors name ``requests[i].field``."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_BATCH_REQUESTS:
        raise ApiError.invalid(
            "requests",
            f"requests must be a list of at most {MAX_BATCH_REQUESTS} video create bodies",
        )
    return [_validate_item(context, f"requests[{i}]", fields) for i, fields in enumerate(value)]


def _validate_item(context: ApiContext, where: str, fields: Any):
    """One batch item's validated request, or ApiError naming ``where.field``."""
    if not isinstance(fields, dict):
        raise ApiError.invalid(where, f"{where} must be an object (a video create body)")
    if "batch_id" in fields:
        raise ApiError.invalid(f"{where}.batch_id", "batch_id is set by the batch")
    try:
        request = validate_create(fields, context.models)
    except ApiError as err:
        err.param = f"{where}.{err.param}" if err.param else where
        err.message = f"{where}: {err.message}"
        raise
    if "priority" not in fields:
        request = dataclasses.replace(request, priority=BATCH_DEFAULT_PRIORITY)
    return request


def create(session: Session, context: ApiContext, principal: Principal, body: Any) -> Batch:
    """The batch and its videos in one transaction: none is stored if any is invalid or the
    tenant has no room for all of them. The scheduler releases them from there."""
    if not isinstance(body, dict):
        raise ApiError.invalid("body", "the body must be a JSON object")
    unknown = sorted(set(body) - set(BATCH_FIELDS))
    if unknown:
        raise ApiError.invalid(
            unknown[0],
            f"Unknown parameter: '{unknown[0]}'. Accepted: {', '.join(BATCH_FIELDS)}",
        )
    metadata = _metadata(body.get("metadata"))
    name = check_name(body.get("name"))
    retention_s = _retention(body.get("retention_seconds"))
    requests = _requests(context, body.get("requests"))
    batch_id = new_batch_id()
    requests = [dataclasses.replace(r, batch_id=batch_id) for r in requests]
    if name is not None:
        _name_free(session, principal.tenant, name)
    jobs.admit(session, context, principal, len(requests))
    session.commit()  # no transaction held while images upload
    rows = [
        jobs.new_job(context, principal.tenant, request, retention_s=retention_s)
        for request in requests
    ]
    now = utcnow()
    batch = Batch(
        id=batch_id,
        tenant=principal.tenant,
        name=name,
        retention_s=retention_s,
        status=BatchStatus.OPEN,
        params={"metadata": metadata} if metadata else None,
        created_at=now,
        updated_at=now,
    )
    session.add(batch)
    try:
        session.flush()
    except IntegrityError:  # the same name, created a moment ago
        session.rollback()
        _drop_images(context, rows)
        _name_free(session, principal.tenant, name or "")
        raise
    transitions.create_jobs(session, rows)
    session.commit()
    log.info("batch %s created with %d videos", batch_id, len(rows))
    return get(session, principal.tenant, batch_id)


def get(session: Session, tenant: str, batch_id: str) -> Batch:
    batch = session.execute(
        select(Batch).where(Batch.id == batch_id, Batch.tenant == tenant)
    ).scalar_one_or_none()
    session.commit()
    if batch is None:
        raise ApiError.not_found(f"No batch found with id '{batch_id}'", "batch_id")
    return batch


def list_page(
    session: Session, tenant: str, after: str | None, limit: int, name: str | None = None
) -> tuple[list[Batch], bool]:
    """The tenant's batches, newest first, after the cursor batch; and whether more follow.
    ``name``: only the batch of that name (a list of one or none)."""
    query = select(Batch).where(Batch.tenant == tenant)
    if name is not None:
        query = query.where(Batch.name == check_name(name))
    rows, more = keyset_page(
        session,
        query,
        Batch,
        tenant=tenant,
        after=after,
        limit=limit,
        descending=True,
        noun="batch",
    )
    session.commit()
    return rows, more


def counts(session: Session, batch_id: str) -> dict[str, int]:
    """The batch's videos by status (deleted ones are not counted)."""
    rows = session.execute(
        select(Job.status, func.count())
        .where(Job.batch_id == batch_id, Job.deleted_at.is_(None))
        .group_by(Job.status)
    ).all()
    session.commit()
    return request_counts({status: count for status, count in rows})


def request_counts(by_status: dict[str, int]) -> dict[str, int]:
    """A batch's ``request_counts`` from its (undeleted) videos counted by job status."""
    return {
        "total": sum(by_status.values()),
        "queued": by_status.get(JobStatus.QUEUED, 0),
        "in_progress": by_status.get(JobStatus.RUNNING, 0),
        "completed": by_status.get(JobStatus.SUCCEEDED, 0),
        "failed": by_status.get(JobStatus.FAILED, 0),
        "cancelled": by_status.get(JobStatus.CANCELLED, 0),
    }


def cancel(session: Session, tenant: str, batch_id: str) -> Batch:
    """Close the batch to new videos and cancel each unfinished one (queued ones now,
    running ones at their next step): two statements, one transaction."""
    get(session, tenant, batch_id)
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.tenant == tenant)
        .values(status=BatchStatus.CANCELLED, updated_at=utcnow())
    )
    touched = transitions.cancel_batch(session, batch_id)
    session.commit()
    log.info("batch %s cancelled: %d unfinished videos asked to stop", batch_id, touched)
    return get(session, tenant, batch_id)


def _drop_images(context: ApiContext, rows: list[Job]) -> None:
    """Input images stored for rows that were not inserted (known item keys, refused)."""
    for row in rows:
        key = JobParams.from_json(row.params).input_image_key
        if key is not None:
            try:
                context.store.delete(key)
            except StorageUnavailable:
                log.warning("could not delete the unused input image %s", key)


@dataclasses.dataclass
class Appended:
    """What ``append`` did with each item, by its index in the request."""

    created: list[tuple[int, Job]] = dataclasses.field(default_factory=list)
    existing: list[tuple[int, Job]] = dataclasses.field(default_factory=list)
    errors: list[tuple[int, ApiError]] = dataclasses.field(default_factory=list)


def _item(context: ApiContext, batch_id: str, index: int, fields: Any):
    """(item key, validated request) of one item, or ApiError naming ``requests[i].field``."""
    where = f"requests[{index}]"
    if not isinstance(fields, dict):
        raise ApiError.invalid(where, f"{where} must be an object (a video create body)")
    fields = dict(fields)
    key = fields.pop("item_key", None)
    if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= 255):
        raise ApiError.invalid(f"{where}.item_key", "item_key must be 1..255 characters")
    request = _validate_item(context, where, fields)
    return key, dataclasses.replace(request, batch_id=batch_id)


def append(
    session: Session, context: ApiContext, principal: Principal, batch_id: str, body: Any
) -> Appended:
    """Add up to ``MAX_BATCH_REQUESTS`` videos to an open batch in one transaction. Each item
    stands alone: a bad one is reported by its index and the rest are stored; an item whose
    ``item_key`` was seen before returns the video it made (a re-run resumes, never
    duplicates). Admission counts only the new ones; a chunk that does not fit is refused
    whole (429)."""
    if not isinstance(body, dict) or set(body) - {"requests"}:
        raise ApiError.invalid("body", 'the body must be {"requests": [video bodies]}')
    items = body.get("requests")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH_REQUESTS:
        raise ApiError.invalid(
            "requests", f"requests must be a list of 1..{MAX_BATCH_REQUESTS} video create bodies"
        )
    retention_s = jobs.check_batch_open(session, principal.tenant, batch_id)
    outcome = Appended()
    valid: list[tuple[int, str | None, Any]] = []
    for index, fields in enumerate(items):
        try:
            key, request = _item(context, batch_id, index, fields)
        except ApiError as err:
            outcome.errors.append((index, err))
            continue
        valid.append((index, key, request))
    keys = [key for _, key, _ in valid if key is not None]
    if len(keys) != len(set(keys)):
        raise ApiError.invalid("requests", "two items of one request share an item_key")
    session.commit()  # no transaction held while images upload
    rows = [
        (index, key, r, jobs.new_job(context, principal.tenant, r, key, retention_s))
        for index, key, r in valid
    ]
    # Insert first, then admit what was new (the unique index tells new from known, whatever
    # the table's size); a chunk that does not fit is rolled back whole.
    created = {job.id for job in transitions.create_new_jobs(session, [row for *_, row in rows])}
    try:
        jobs.admit_inserted(session, context, principal, len(created))
    except ApiError:
        session.rollback()
        _drop_images(context, [row for *_, row in rows])
        raise
    session.commit()
    known = [(index, key, r, row) for index, key, r, row in rows if row.id not in created]
    seen = {
        job.idempotency_key: job
        for job in session.execute(
            select(Job).where(
                Job.tenant == principal.tenant,
                Job.idempotency_key.in_([key for _, key, _, _ in known]),
            )
        ).scalars()
    } if known else {}  # fmt: skip
    session.commit()
    _drop_images(context, [row for *_, row in known])
    outcome.created = [(index, row) for index, _, _, row in rows if row.id in created]
    for index, key, request, _row in known:
        job = seen[key]
        if job.request_hash != request.request_hash() or job.batch_id != batch_id:
            outcome.errors.append(
                (
                    index,
                    ApiError(
                        409,
                        f"requests[{index}]: item_key {key!r} was used for video '{job.id}' "
                        "with another body",
                        param=f"requests[{index}].item_key",
                        code="idempotency_key_reused",
                    ),
                )
            )
        else:
            outcome.existing.append((index, job))
    outcome.errors.sort(key=lambda pair: pair[0])
    log.info(
        "batch %s: %d videos added, %d already there, %d refused",
        batch_id,
        len(outcome.created),
        len(outcome.existing),
        len(outcome.errors),
    )
    return outcome


#: The window ``fvb bulk status`` measures a batch's throughput over.
RATE_WINDOW_S = 600


def progress(session: Session, batch_id: str, counts: dict[str, int]) -> dict[str, Any]:
    """Videos of the batch finished over the last ``RATE_WINDOW_S`` (one range over the
    batch's ``finished_at`` index), the rate per second, and the ETA of the rest at it."""
    since = utcnow() - timedelta(seconds=RATE_WINDOW_S)
    finished = session.execute(
        select(func.count())
        .select_from(Job)
        .where(Job.batch_id == batch_id, Job.finished_at >= since, Job.deleted_at.is_(None))
    ).scalar_one()
    session.commit()
    rate = finished / RATE_WINDOW_S
    unfinished = counts["queued"] + counts["in_progress"]
    return {
        "window_seconds": RATE_WINDOW_S,
        "finished_in_window": finished,
        "videos_per_second": round(rate, 4),
        "eta_seconds": round(unfinished / rate) if rate and unfinished else None,
    }


def items_page(
    session: Session, tenant: str, batch_id: str, after: str | None, limit: int
) -> tuple[list[Job], bool]:
    """The batch's videos in id order after ``after`` (the batch's ``(batch_id, id)`` index
    walks straight to the page), and whether more follow."""
    get(session, tenant, batch_id)
    query = select(Job).where(Job.batch_id == batch_id, Job.deleted_at.is_(None))
    if after:
        query = query.where(Job.id > after)
    rows = list(session.execute(query.order_by(Job.id).limit(limit + 1)).scalars())
    session.commit()
    return rows[:limit], len(rows) > limit


def retry_failed(
    session: Session, context: ApiContext, principal: Principal, batch_id: str, code: str | None
) -> list[str]:
    """Queue the batch's failed videos again (those that failed with ``code`` when given):
    new attempts of the same videos, so item keys, ids and the manifest's rows stay. All of
    them or none: they are admitted like new videos (429 when the tenant has no room)."""
    if code is not None and (not isinstance(code, str) or not 1 <= len(code) <= 64):
        raise ApiError.invalid("code", "code must be an error code of 1..64 characters")
    jobs.check_batch_open(session, principal.tenant, batch_id)
    jobs.admit(session, context, principal, transitions.count_failed(session, batch_id, code))
    retried = transitions.retry_failed(session, batch_id, code, context.settings.job_max_attempts)
    session.commit()
    log.info("batch %s: %d failed videos queued again", batch_id, len(retried))
    return retried
