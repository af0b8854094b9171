"""``/v1/batches``: bulk generation. Create a batch (with up to 1000 videos in one call),
follow its counts, cancel it; its videos are ordinary videos (``GET /v1/videos?batch_id=``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends

from scheduler.api import batches
from scheduler.api.auth import Tenant
from scheduler.api.context import ApiContext, get_context
from scheduler.api.schemas import BatchObject

router = APIRouter(prefix="/v1", tags=["batches"])

Context = Annotated[ApiContext, Depends(get_context)]


def _object(context: ApiContext, batch) -> BatchObject:
    return BatchObject.from_batch(batch, batches.counts(context, batch.id))


@router.post("/batches", response_model=BatchObject)
def create_batch(
    tenant: Tenant, context: Context, body: Annotated[Any, Body()] = None
) -> BatchObject:
    return _object(context, batches.create(context, tenant, {} if body is None else body))


@router.get("/batches/{batch_id}", response_model=BatchObject)
def retrieve_batch(tenant: Tenant, context: Context, batch_id: str) -> BatchObject:
    return _object(context, batches.get(context, tenant, batch_id))


@router.post("/batches/{batch_id}/cancel", response_model=BatchObject)
def cancel_batch(tenant: Tenant, context: Context, batch_id: str) -> BatchObject:
    return _object(context, batches.cancel(context, tenant, batch_id))
