"""Cursor pages of a tenant's rows (jobs, batches) in (created_at, id) order, and the limit
check every list route applies."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, and_, or_, select
from sqlalchemy.orm import Session

from scheduler.api.errors import ApiError

MAX_LIST_LIMIT = 100
#: The range ``check_limit`` enforces, for the OpenAPI schema of every ``limit`` parameter.
LIMIT_RANGE = {"minimum": 1, "maximum": MAX_LIST_LIMIT}


def check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise ApiError.invalid(
            "limit", f"limit must be between 1 and {MAX_LIST_LIMIT}, got {limit}"
        )


def keyset_page(
    session: Session,
    query: Select,
    model: Any,
    *,
    tenant: str,
    after: str | None,
    limit: int,
    descending: bool,
    noun: str,
) -> tuple[list[Any], bool]:
    """Up to ``limit`` rows of ``query`` (rows of ``model``, a mapped class with ``id``,
    ``tenant`` and ``created_at``) that come after the tenant's row ``after``, and whether
    more follow. Keyset, not offset: rows inserted meanwhile neither repeat nor go missing."""
    if after is not None:
        anchor = session.execute(
            select(model.created_at, model.id).where(model.id == after, model.tenant == tenant)
        ).one_or_none()
        if anchor is None:
            raise ApiError.invalid("after", f"No {noun} found with id '{after}' to list after")

        def beyond(column, value):
            return column < value if descending else column > value

        query = query.where(
            or_(
                beyond(model.created_at, anchor.created_at),
                and_(model.created_at == anchor.created_at, beyond(model.id, anchor.id)),
            )
        )
    if descending:
        query = query.order_by(model.created_at.desc(), model.id.desc())
    else:
        query = query.order_by(model.created_at.asc(), model.id.asc())
    rows = list(session.execute(query.limit(limit + 1)).scalars())
    return rows[:limit], len(rows) > limit
