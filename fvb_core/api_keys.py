"""API keys in the database: created (shown once), stored as sha256 with a short prefix to
recognise them by, looked up per request, revoked by setting ``revoked_at``. An operator key
may also read ``/metrics`` (and, beyond its tenant, the whole fleet)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from fvb_core.db.models import ApiKey

KEY_PREFIX = "fvb-"


@dataclass(frozen=True)
class Principal:
    """Who a request acts for."""

    tenant: str
    operator: bool = False
    #: The tenant's queued-jobs limit while this key is used; None: the deployment's.
    max_queued: int | None = None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(
    session: Session,
    tenant: str,
    name: str | None = None,
    operator: bool = False,
    max_queued: int | None = None,
) -> str:
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
            operator=operator,
            max_queued=max_queued,
        )
    )
    session.flush()
    return key


def principal_for_key(session: Session, key: str) -> Principal | None:
    """Who a live (not revoked) key acts for, or None."""
    row = session.execute(
        select(ApiKey.tenant, ApiKey.operator, ApiKey.max_queued).where(
            ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)
        )
    ).one_or_none()
    if row is None:
        return None
    return Principal(row.tenant, bool(row.operator), row.max_queued)
