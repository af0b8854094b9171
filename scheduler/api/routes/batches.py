"""``/v1/batches``: bulk generation. Create a batch (with up to 1000 videos in one call),
list them, follow its counts, cancel it; its videos are ordinary videos
(``GET /v1/videos?batch_id=``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy.orm import Session

from scheduler.api import batches
from scheduler.api.auth import CurrentPrincipal, Tenant
from scheduler.api.body import parse_json, read_limited
from scheduler.api.context import ApiContext, get_context
from scheduler.api.errors import error_body
from scheduler.api.openapi import VIDEO_FIELDS, errors
from scheduler.api.pagination import LIMIT_RANGE, check_limit
from scheduler.api.schemas import (
    BatchItem,
    BatchItemError,
    BatchList,
    BatchObject,
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


async def _batch_body(request: Request) -> Any:
    """The JSON body (an empty one is ``{}``: a batch that videos join later)."""
    raw = await read_limited(request, MAX_BATCH_BODY_BYTES)
    return parse_json(raw, request) if raw.strip() else {}


Context = Annotated[ApiContext, Depends(get_context)]


def _object(session: Session, batch) -> BatchObject:
    return BatchObject.from_batch(batch, batches.counts(session, batch.id))


@router.post(
    "/batches",
    response_model=BatchObject,
    openapi_extra=_BATCH_BODY,
    responses=errors(400, 404, 409, 413),
)
def create_batch(
    principal: CurrentPrincipal,
    session: SessionDep,
    context: Context,
    body: Annotated[Any, Depends(_batch_body)],
) -> BatchObject:
    return _object(session, batches.create(session, context, principal, body))


@router.get("/batches", response_model=BatchList, responses=errors(400))
def list_batches(
    tenant: Tenant,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(json_schema_extra=LIMIT_RANGE)] = 20,
) -> BatchList:
    check_limit(limit)
    rows, has_more = batches.list_page(session, tenant, after or None, limit)
    data = [_object(session, batch) for batch in rows]
    return BatchList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=has_more,
    )


@router.get("/batches/{batch_id}", response_model=BatchObject, responses=errors(404))
def retrieve_batch(tenant: Tenant, session: SessionDep, batch_id: str) -> BatchObject:
    return _object(session, batches.get(session, tenant, batch_id))


@router.post("/batches/{batch_id}/cancel", response_model=BatchObject, responses=errors(404))
def cancel_batch(tenant: Tenant, session: SessionDep, batch_id: str) -> BatchObject:
    return _object(session, batches.cancel(session, tenant, batch_id))


@router.post(
    "/batches/{batch_id}/videos",
    response_model=BatchVideosAdded,
    openapi_extra=_APPEND_BODY,
    responses=errors(400, 404, 409, 413),
)
def add_videos(
    principal: CurrentPrincipal,
    session: SessionDep,
    context: Context,
    batch_id: str,
    body: Annotated[Any, Depends(_batch_body)],
) -> BatchVideosAdded:
    """Add up to 1000 videos to the batch; each item may carry an ``item_key`` that makes
    re-sending it harmless. Bad items come back in ``errors`` by index; the rest are stored."""
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
