"""``/v1/webhooks``: URLs that get the tenant's ``video.completed``, ``video.failed`` and
``batch.completed`` events (or one batch's), signed the standard-webhooks way; delivered by
the scheduler process (``scheduler/webhooks.py``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from scheduler.api import webhooks
from scheduler.api.auth import Tenant
from scheduler.api.body import read_json
from scheduler.api.context import ApiContext, get_context
from scheduler.api.openapi import errors
from scheduler.api.session import SessionDep
from scheduler.api.webhooks import WebhookDeleted, WebhookList, WebhookObject

router = APIRouter(prefix="/v1", tags=["webhooks"], responses=errors(401, 403, 429, 500, 503))

Context = Annotated[ApiContext, Depends(get_context)]

#: A URL of at most 2048 characters and a batch id fit many times over.
MAX_WEBHOOK_BODY_BYTES = 16 * 1024


async def _body(request: Request) -> Any:
    return await read_json(request, MAX_WEBHOOK_BODY_BYTES)


@router.post(
    "/webhooks",
    response_model=WebhookObject,
    openapi_extra=webhooks.CREATE_BODY,
    responses=errors(400, 404, 413),
)
def create_webhook(
    tenant: Tenant,
    session: SessionDep,
    context: Context,
    body: Annotated[Any, Depends(_body)],
) -> WebhookObject:
    """Register a URL; the answer carries its signing secret (``whsec_...``), shown once."""
    row = webhooks.create(session, context.settings, tenant, body)
    return WebhookObject.from_row(row, with_secret=True)


@router.get("/webhooks", response_model=WebhookList)
def list_webhooks(tenant: Tenant, session: SessionDep) -> WebhookList:
    return WebhookList(data=[WebhookObject.from_row(r) for r in webhooks.list_all(session, tenant)])


@router.get("/webhooks/{webhook_id}", response_model=WebhookObject, responses=errors(404))
def retrieve_webhook(tenant: Tenant, session: SessionDep, webhook_id: str) -> WebhookObject:
    return WebhookObject.from_row(webhooks.get(session, tenant, webhook_id))


@router.delete("/webhooks/{webhook_id}", response_model=WebhookDeleted, responses=errors(404))
def delete_webhook(tenant: Tenant, session: SessionDep, webhook_id: str) -> WebhookDeleted:
    webhooks.remove(session, tenant, webhook_id)
    return WebhookDeleted(id=webhook_id)
