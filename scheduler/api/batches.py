"""What the batch routes do: create a batch (optionally with its videos, all or none), count
its videos by status, cancel every unfinished one. A batch is a tenant's named group of jobs;
videos join it at creation or later through ``POST /v1/videos`` with ``batch_id``."""

from __future__ import annotations

import dataclasses
import logging
import secrets
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from fvb_core.api_keys import Principal
from fvb_core.db import transitions
from fvb_core.db.models import Batch, Job, utcnow
from fvb_core.jobs import UNFINISHED_STATUSES, BatchStatus, JobStatus
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
    validated = []
    for index, fields in enumerate(value):
        where = f"requests[{index}]"
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
        validated.append(request)
    return validated


def create(session: Session, context: ApiContext, principal: Principal, body: Any) -> Batch:
    """The batch and its videos in one transaction: none is stored if any is invalid or the
    tenant has no room for all of them. The scheduler releases them from there."""
    if not isinstance(body, dict):
        raise ApiError.invalid("body", "the body must be a JSON object")
    unknown = sorted(set(body) - {"requests", "metadata"})
    if unknown:
        raise ApiError.invalid(
            unknown[0], f"Unknown parameter: '{unknown[0]}'. Accepted: metadata, requests"
        )
    metadata = _metadata(body.get("metadata"))
    requests = _requests(context, body.get("requests"))
    batch_id = new_batch_id()
    requests = [dataclasses.replace(r, batch_id=batch_id) for r in requests]
    jobs.admit(session, context, principal, len(requests))
    session.commit()  # no transaction held while images upload
    rows = [jobs.new_job(context, principal.tenant, request) for request in requests]
    now = utcnow()
    batch = Batch(
        id=batch_id,
        tenant=principal.tenant,
        status=BatchStatus.OPEN,
        params={"metadata": metadata} if metadata else None,
        created_at=now,
        updated_at=now,
    )
    session.add(batch)
    session.flush()
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
    session: Session, tenant: str, after: str | None, limit: int
) -> tuple[list[Batch], bool]:
    """The tenant's batches, newest first, after the cursor batch; and whether more follow."""
    rows, more = keyset_page(
        session,
        select(Batch).where(Batch.tenant == tenant),
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
