"""API keys: ``Authorization: Bearer fvb-...``, stored as sha256, one tenant per key.

A key is shown once, when :func:`create_api_key` makes it; the database keeps only its hash
and a short prefix to recognise it by. With ``auth_enabled = False`` every request is the
tenant ``"default"`` (``create_app`` allows that only on a loopback address).
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from scheduler.api.context import ApiContext, get_context
from scheduler.api.errors import ApiError
from scheduler.db.models import ApiKey
from scheduler.db.session import session_scope

KEY_PREFIX = "fvb-"
DEFAULT_TENANT = "default"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(session: Session, tenant: str, name: str | None = None) -> str:
    """Store a new key for `tenant` and return it in plain text (the only time it is seen).

    The caller commits the session.
    """
    if not tenant:
        raise ValueError("tenant must be a non-empty string")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiKey(
            id=f"key_{secrets.token_hex(8)}",
            tenant=tenant,
            name=name,
            key_hash=hash_key(key),
            prefix=key[:12],
        )
    )
    session.flush()
    return key


def tenant_for_key(session: Session, key: str) -> str | None:
    """The tenant of a live (not revoked) key, or None."""
    return session.execute(
        select(ApiKey.tenant).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    ).scalar_one_or_none()


def _unauthorized(message: str) -> ApiError:
    return ApiError(
        401, message, code="invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="fvb"'}
    )


def current_tenant(request: Request, context: Annotated[ApiContext, Depends(get_context)]) -> str:
    """FastAPI dependency: the tenant the request acts for, or 401."""
    if not context.settings.auth_enabled:
        return DEFAULT_TENANT
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise _unauthorized(
            "Missing API key: send it as 'Authorization: Bearer <key>' (create one with "
            "'fvb keys create')."
        )
    with session_scope(context.settings.database_url) as session:
        tenant = tenant_for_key(session, key)
    if tenant is None:
        shown = key[:8] + "..." if len(key) > 8 else "..."
        raise _unauthorized(f"Incorrect API key provided: {shown} (unknown or revoked).")
    return tenant


Tenant = Annotated[str, Depends(current_tenant)]
