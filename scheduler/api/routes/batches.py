"""``/v1/batches``: bulk generation. Create a batch (with up to 1000 videos in one call),
list them, follow its counts, cancel it; its videos are ordinary videos
(``GET /v1/videos?batch_id=``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from scheduler.api import batches, manifest, upload
from scheduler.api.auth import CurrentPrincipal, Tenant
from scheduler.api.body import parse_json, read_limited
from scheduler.api.context import ApiContext, get_context
from scheduler.api.errors import ApiError, error_body
from scheduler.api.openapi import VIDEO_FIELDS, errors
from scheduler.api.pagination import LIMIT_RANGE, check_limit
from scheduler.api.schemas import (
    BatchItem,
    BatchItemError,
    BatchItemList,
    BatchItemRow,
    BatchList,
    BatchObject,
    BatchRetried,
    BatchUpload,
    BatchUploaded,
    BatchVideosAdded,
)
from scheduler.api.session import SessionDep

router = APIRouter(prefix="/v1", tags=["batches"], responses=errors(401, 403, 429, 500, 503))

#: A batch of 1000 video bodies with short prompts fits many times over; a body past this
#: is refused (413) before it is read whole.
MAX_BATCH_BODY_BYTES = 32 * 1024 * 1024

_BATCH_BODY = {
    "requestBody": {
        "required": False,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "requests": {
                            "type": ["array", "null"],
                            "maxItems": batches.MAX_BATCH_REQUESTS,
                            "items": {
                                "type": "object",
                                "required": ["prompt"],
                                "additionalProperties": False,
                                "properties": {
                                    k: v for k, v in VIDEO_FIELDS.items() if k != "batch_id"
                                },
                            },
                        },
                        "metadata": {
                            "type": ["object", "null"],
                            "additionalProperties": {"type": "string"},
                            "maxProperties": batches.MAX_METADATA_ITEMS,
                        },
                    },
                }
            }
        },
    }
}


# Each item stands alone: one that breaks these rules comes back in ``errors`` by its index
# and the others are stored, so the schema of an item is documented, not enforced whole.
_ITEM: dict = {
    "description": "A video create body (an object: the fields of POST /v1/videos but "
    "batch_id), plus an optional item_key (1..255 characters) that makes sending it again "
    "harmless. Checked item by item: a bad one is reported in errors.",
}
_APPEND_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["requests"],
                    "additionalProperties": False,
                    "properties": {
                        "requests": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": batches.MAX_BATCH_REQUESTS,
                            "items": _ITEM,
                        }
                    },
                }
            }
        },
    }
}


#: What ``_batch_body`` gives for a JSONL upload: the route reads the body as it streams.
STREAMED = object()


async def _batch_body(request: Request) -> Any:
    """The JSON body (an empty one is ``{}``: a batch that videos join later), or STREAMED."""
    if upload.is_jsonl(request):
        return STREAMED
    raw = await read_limited(request, MAX_BATCH_BODY_BYTES)
    return parse_json(raw, request) if raw.strip() else {}


Context = Annotated[ApiContext, Depends(get_context)]
#: Items per page of ``GET /v1/batches/{id}/items``.
MAX_ITEMS_PAGE = 1000
ITEMS_LIMIT_RANGE = {"minimum": 1, "maximum": MAX_ITEMS_PAGE}


def _object(session: Session, batch) -> BatchObject:
    return BatchObject.from_batch(batch, batches.counts(session, batch.id))


@router.post(
    "/batches",
    # BatchUploaded first: a response_model of BatchObject alone drops a JSONL upload's
    # ``upload`` (FastAPI serializes by the declared model, not the returned subclass).
    response_model=BatchUploaded | BatchObject,
    openapi_extra=_BATCH_BODY,
    responses=errors(400, 404, 409, 413),
)
def create_batch(
    principal: CurrentPrincipal,
    session: SessionDep,
    context: Context,
    request: Request,
    body: Annotated[Any, Depends(_batch_body)],
    name: Annotated[str | None, Query(description="JSONL uploads: the batch's name")] = None,
    retention_seconds: Annotated[
        int | None, Query(description="JSONL uploads: the batch's retention")
    ] = None,
) -> BatchUploaded | BatchObject:
    """A JSON body creates the batch and up to 1000 videos, all or none. A JSONL body
    (``Content-Type: application/x-ndjson``, one video body per line, any number of lines)
    creates the batch, then stores the lines as they stream in; refused lines are reported
    by number in ``upload.errors`` and the rest are stored."""
    if body is not STREAMED:
        if name is not None or retention_seconds is not None:
            raise ApiError.invalid(
                "name" if name is not None else "retention_seconds",
                "give name and retention_seconds in the JSON body (query parameters are for "
                "JSONL uploads)",
            )
        return _object(session, batches.create(session, context, principal, body))
    options = {"name": name, "retention_seconds": retention_seconds}
    # ``is not None``: retention_seconds=0 or name= are checked (400), not silently dropped.
    given = {k: v for k, v in options.items() if v is not None}
    batch = batches.create(session, context, principal, given)
    return _uploaded(session, context, principal, batch.id, request)


def _uploaded(session, context, principal, batch_id: str, request: Request) -> BatchUploaded:
    done = upload.upload(session, context, principal, batch_id, upload.lines(request))
    batch = batches.get(session, principal.tenant, batch_id)
    counts = batches.counts(session, batch_id)
    return BatchUploaded(
        **BatchObject.from_batch(batch, counts).model_dump(),
        upload=BatchUpload(**done.to_json()),
    )


@router.get("/batches", response_model=BatchList, responses=errors(400))
def list_batches(
    tenant: Tenant,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(json_schema_extra=LIMIT_RANGE)] = 20,
    name: Annotated[str | None, Query(description="only the batch of this name")] = None,
) -> BatchList:
    check_limit(limit)
    rows, has_more = batches.list_page(session, tenant, after or None, limit, name)
    data = [_object(session, batch) for batch in rows]
    return BatchList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=has_more,
    )


@router.get("/batches/{batch_id}", response_model=BatchObject, responses=errors(404))
def retrieve_batch(tenant: Tenant, session: SessionDep, batch_id: str) -> BatchObject:
    """The batch, its videos by state, and ``progress``: throughput lately and the ETA."""
    batch = batches.get(session, tenant, batch_id)
    counts = batches.counts(session, batch.id)
    return BatchObject.from_batch(batch, counts, batches.progress(session, batch.id, counts))


@router.get("/batches/{batch_id}/items", response_model=BatchItemList, responses=errors(400, 404))
def list_items(
    tenant: Tenant,
    session: SessionDep,
    batch_id: str,
    after: str | None = None,
    limit: Annotated[int, Query(json_schema_extra=ITEMS_LIMIT_RANGE)] = 100,
) -> BatchItemList:
    """The batch's videos with their item keys, in id order, a page at a time."""
    if not 1 <= limit <= MAX_ITEMS_PAGE:
        raise ApiError.invalid("limit", f"limit must be 1..{MAX_ITEMS_PAGE}")
    rows, has_more = batches.items_page(session, tenant, batch_id, after or None, limit)
    data = [BatchItemRow.from_job(job) for job in rows]
    return BatchItemList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=has_more,
    )


@router.get(
    "/batches/{batch_id}/manifest",
    responses={
        **errors(404),
        200: {"content": {"application/x-ndjson": {}}, "description": "one row per video"},
    },
)
def batch_manifest(
    tenant: Tenant, session: SessionDep, context: Context, batch_id: str
) -> StreamingResponse:
    """The manifest as JSON lines: one row per video (item key, line, prompt, seed, every
    parameter, model and revision, status, error, storage URI, presigned URL, sha256,
    bytes, frames, fps, size, queue wait, render and upload times, worker, GPU)."""
    batches.get(session, tenant, batch_id)
    return StreamingResponse(
        manifest.jsonl(context.settings.database_url, batch_id, context.store),
        media_type="application/x-ndjson",
    )


@router.post(
    "/batches/{batch_id}/retry_failed",
    response_model=BatchRetried,
    responses=errors(400, 404, 409),
)
def retry_failed(
    principal: CurrentPrincipal,
    session: SessionDep,
    context: Context,
    batch_id: str,
    code: Annotated[str | None, Query(description="only videos that failed with it")] = None,
) -> BatchRetried:
    """Queue the batch's failed videos again: new attempts of the same videos (same ids and
    item keys), all or none (429 when the tenant's queue has no room for them)."""
    retried = batches.retry_failed(session, context, principal, batch_id, code)
    batch = batches.get(session, principal.tenant, batch_id)
    counts = batches.counts(session, batch_id)
    return BatchRetried(**BatchObject.from_batch(batch, counts).model_dump(), retried=retried)


@router.post("/batches/{batch_id}/cancel", response_model=BatchObject, responses=errors(404))
def cancel_batch(tenant: Tenant, session: SessionDep, batch_id: str) -> BatchObject:
    return _object(session, batches.cancel(session, tenant, batch_id))


@router.post(
    "/batches/{batch_id}/videos",
    response_model=BatchVideosAdded | BatchUploaded,
    openapi_extra=_APPEND_BODY,
    responses=errors(400, 404, 409, 413),
)
def add_videos(
    principal: CurrentPrincipal,
    session: SessionDep,
    context: Context,
    request: Request,
    batch_id: str,
    body: Annotated[Any, Depends(_batch_body)],
) -> BatchVideosAdded | BatchUploaded:
    """Add up to 1000 videos to the batch; each item may carry an ``item_key`` that makes
    re-sending it harmless. Bad items come back in ``errors`` by index; the rest are stored.
    A JSONL body (any number of lines) answers as a JSONL ``POST /v1/batches`` does."""
    if body is STREAMED:
        return _uploaded(session, context, principal, batch_id, request)
    outcome = batches.append(session, context, principal, batch_id, body)
    return BatchVideosAdded(
        batch_id=batch_id,
        data=sorted(
            [BatchItem(index=i, id=job.id, created=True) for i, job in outcome.created]
            + [BatchItem(index=i, id=job.id, created=False) for i, job in outcome.existing],
            key=lambda item: item.index,
        ),
        errors=[
            BatchItemError(
                index=i, error=error_body(err.status, err.message, err.param, err.code)["error"]
            )
            for i, err in outcome.errors
        ],
    )
