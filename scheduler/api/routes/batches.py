"""``/v1/batches``: bulk generation. Create a batch (with up to 1000 videos in one call),
list them, follow its counts, cancel it; its videos are ordinary videos
(``GET /v1/videos?batch_id=``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends

from scheduler.api import batches
from scheduler.api.auth import Tenant
from scheduler.api.context import ApiContext, get_context
from scheduler.api.pagination import check_limit
from scheduler.api.schemas import BatchList, BatchObject

router = APIRouter(prefix="/v1", tags=["batches"])

Context = Annotated[ApiContext, Depends(get_context)]


def _object(context: ApiContext, batch) -> BatchObject:
    return BatchObject.from_batch(batch, batches.counts(context, batch.id))


@router.post("/batches", response_model=BatchObject)
def create_batch(
    tenant: Tenant, context: Context, body: Annotated[Any, Body()] = None
) -> BatchObject:
    return _object(context, batches.create(context, tenant, {} if body is None else body))


@router.get("/batches", response_model=BatchList)
def list_batches(
    tenant: Tenant, context: Context, after: str | None = None, limit: int = 20
) -> BatchList:
    check_limit(limit)
    rows, has_more = batches.list_page(context, tenant, after, limit)
    data = [_object(context, batch) for batch in rows]
    return BatchList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=has_more,
    )


@router.get("/batches/{batch_id}", response_model=BatchObject)
def retrieve_batch(tenant: Tenant, context: Context, batch_id: str) -> BatchObject:
    return _object(context, batches.get(context, tenant, batch_id))


@router.post("/batches/{batch_id}/cancel", response_model=BatchObject)
def cancel_batch(tenant: Tenant, context: Context, batch_id: str) -> BatchObject:
    return _object(context, batches.cancel(context, tenant, batch_id))
