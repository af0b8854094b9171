"""``fvb keys``: create, list and revoke API keys in the database.

A revoked key is refused from its next request on (the API looks every key up); the row is
kept, with ``revoked_at``, so ``fvb keys list`` shows what existed and when it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import or_, select, update

from fvb_core.api_keys import create_api_key
from fvb_core.db.models import ApiKey, utcnow
from fvb_core.db.session import session_scope


@dataclass(frozen=True)
class KeyRow:
    id: str
    tenant: str
    name: str | None
    prefix: str
    operator: bool
    created_at: datetime
    revoked_at: datetime | None


def create(
    url: str,
    tenant: str,
    name: str | None = None,
    operator: bool = False,
    max_queued: int | None = None,
) -> str:
    with session_scope(url) as session:
        return create_api_key(session, tenant, name=name, operator=operator, max_queued=max_queued)


def listed(url: str, tenant: str | None = None) -> list[KeyRow]:
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if tenant is not None:
        query = query.where(ApiKey.tenant == tenant)
    with session_scope(url) as session:
        return [
            KeyRow(k.id, k.tenant, k.name, k.prefix, k.operator, k.created_at, k.revoked_at)
            for k in session.execute(query).scalars()
        ]


def revoke(url: str, id_or_prefix: str) -> KeyRow:
    """Revoke the one live key with this id or prefix; ValueError when none or several match."""
    if len(id_or_prefix) < 6:
        raise ValueError("key: give the key's id (key_...) or at least 6 characters of its prefix")
    with session_scope(url) as session:
        matches = list(
            session.execute(
                select(ApiKey).where(
                    or_(ApiKey.id == id_or_prefix, ApiKey.prefix.startswith(id_or_prefix))
                )
            ).scalars()
        )
        live = [key for key in matches if key.revoked_at is None]
        if not live:
            state = "is already revoked" if matches else "matches no key"
            raise ValueError(f"key {id_or_prefix!r} {state} (see `fvb keys list`)")
        if len(live) > 1:
            ids = ", ".join(key.id for key in live)
            raise ValueError(f"key {id_or_prefix!r} matches {len(live)} keys ({ids}): give the id")
        key = live[0]
        now = utcnow()
        session.execute(update(ApiKey).where(ApiKey.id == key.id).values(revoked_at=now))
        return KeyRow(key.id, key.tenant, key.name, key.prefix, key.operator, key.created_at, now)


def table(rows: list[KeyRow]) -> str:
    """The rows as an aligned text table (what ``fvb keys list`` prints)."""
    header = ("ID", "TENANT", "PREFIX", "ROLE", "CREATED", "STATE", "NAME")
    lines = [header]
    for row in rows:
        state = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "live"
        lines.append(
            (
                row.id,
                row.tenant,
                row.prefix,
                "operator" if row.operator else "tenant",
                f"{row.created_at:%Y-%m-%d %H:%M}",
                state,
                row.name or "",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
