"""What the webhook routes do: register a URL for the tenant's events (or one batch's),
list them, delete one. The URL is checked here (``fvb_core.webhook_urls``) and again at
every delivery; the signing secret is made here and shown once, in the create answer."""

from __future__ import annotations

import logging
import secrets
from typing import Any, Literal

from pydantic import BaseModel
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from fvb_core.db.models import Batch, Webhook, utcnow
from fvb_core.settings import Settings
from fvb_core.webhook_signing import new_secret
from fvb_core.webhook_urls import MAX_URL_LENGTH, UrlRefused, check_url
from scheduler.api.errors import ApiError
from scheduler.api.schemas import unix

log = logging.getLogger(__name__)

#: Webhooks one tenant may register (each event is queued once per webhook).
MAX_WEBHOOKS_PER_TENANT = 20

CREATE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["url"],
                    "additionalProperties": False,
                    "properties": {
                        "url": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": MAX_URL_LENGTH,
                            "description": "http(s) URL on a public address; events are "
                            "POSTed to it, signed (standard-webhooks)",
                        },
                        "batch_id": {
                            "type": ["string", "null"],
                            "description": "Only this batch's events (default: every "
                            "video and batch of the tenant)",
                        },
                    },
                }
            }
        },
    }
}


class WebhookObject(BaseModel):
    id: str
    object: Literal["webhook"] = "webhook"
    url: str
    batch_id: str | None
    #: ``whsec_...``: only in the answer that created it.
    secret: str | None = None
    created_at: int

    @classmethod
    def from_row(cls, row: Webhook, with_secret: bool = False) -> WebhookObject:
        return cls(
            id=row.id,
            url=row.url,
            batch_id=row.batch_id,
            secret=row.secret if with_secret else None,
            created_at=unix(row.created_at) or 0,
        )


class WebhookList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookObject]


class WebhookDeleted(BaseModel):
    id: str
    object: Literal["webhook.deleted"] = "webhook.deleted"
    deleted: bool = True


def new_webhook_id() -> str:
    return f"wh_{secrets.token_hex(12)}"


def create(session: Session, settings: Settings, tenant: str, body: Any) -> Webhook:
    if not isinstance(body, dict):
        raise ApiError.invalid("body", 'the body must be {"url": ..., "batch_id": ...}')
    unknown = sorted(set(body) - {"url", "batch_id"})
    if unknown:
        raise ApiError.invalid(
            unknown[0], f"Unknown parameter: '{unknown[0]}'. Accepted: batch_id, url"
        )
    url, batch_id = body.get("url"), body.get("batch_id")
    if not isinstance(url, str):
        raise ApiError.invalid("url", "url must be a string (an http or https URL)")
    if batch_id is not None and not isinstance(batch_id, str):
        raise ApiError.invalid("batch_id", "batch_id must be a string")
    try:
        check_url(url, settings.webhook_allow_hosts)
    except UrlRefused as err:
        raise ApiError.invalid("url", str(err), "invalid_url") from None
    if batch_id:
        owned = session.execute(
            select(Batch.id).where(Batch.id == batch_id, Batch.tenant == tenant)
        ).scalar_one_or_none()
        if owned is None:
            raise ApiError.not_found(f"No batch found with id '{batch_id}'", "batch_id")
    count = session.execute(
        select(func.count()).select_from(Webhook).where(Webhook.tenant == tenant)
    ).scalar_one()
    if count >= MAX_WEBHOOKS_PER_TENANT:
        message = f"at most {MAX_WEBHOOKS_PER_TENANT} webhooks per tenant; delete one first"
        raise ApiError.invalid("url", message, "too_many_webhooks")
    row = Webhook(
        id=new_webhook_id(),
        tenant=tenant,
        batch_id=batch_id or None,
        url=url,
        secret=new_secret(),
        created_at=utcnow(),
    )
    session.add(row)
    session.commit()
    log.info("webhook %s registered for tenant %s (batch %s)", row.id, tenant, row.batch_id)
    return row


def list_all(session: Session, tenant: str) -> list[Webhook]:
    rows = list(
        session.execute(
            select(Webhook).where(Webhook.tenant == tenant).order_by(Webhook.created_at.desc())
        ).scalars()
    )
    session.commit()
    return rows


def get(session: Session, tenant: str, webhook_id: str) -> Webhook:
    row = session.execute(
        select(Webhook).where(Webhook.id == webhook_id, Webhook.tenant == tenant)
    ).scalar_one_or_none()
    session.commit()
    if row is None:
        raise ApiError.not_found(f"No webhook found with id '{webhook_id}'", "webhook_id")
    return row


def remove(session: Session, tenant: str, webhook_id: str) -> None:
    """Delete the webhook; its undelivered events go with it."""
    gone = session.execute(
        delete(Webhook)
        .where(Webhook.id == webhook_id, Webhook.tenant == tenant)
        .returning(Webhook.id)
    ).scalar_one_or_none()
    if gone is None:
        session.rollback()
        raise ApiError.not_found(f"No webhook found with id '{webhook_id}'", "webhook_id")
    session.commit()
