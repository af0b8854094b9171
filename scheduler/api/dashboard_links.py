"""Short-lived signed URLs for what a browser fetches without headers: the console's
``<video src>`` and its batch-manifest download link, which cannot send the Bearer key.

The page asks for a link with its key (``POST /dashboard/jobs/{id}/media``); the link names
the key by id and carries an expiry and an HMAC-SHA256 of (key id, resource, expiry) under
the key's stored hash (sha256 of the key: only the key's holder and the database know it).
Every use looks the key up again, so a revoked key's links stop working at once, and the
link answers only what that key may see (its tenant's, or any for an operator). No new
secret to configure or share between API replicas. Without auth (loopback only) a link is
the bare path, served to loopback callers as every other route is.

The video streams through the API (``Range`` requests answered 206 from the store's own
ranged GET), so the page's CSP needs only ``media-src 'self'`` and the store need not be
reachable from the operator's browser.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask
from starlette.datastructures import URL

from fvb_core.api_keys import Principal, hash_key
from fvb_core.db.models import ApiKey
from fvb_core.storage import ObjectMissing, StorageUnavailable
from scheduler.api import auth
from scheduler.api.context import ApiContext
from scheduler.api.errors import ApiError
from scheduler.api.release_once import ReleaseOnce

#: How long a link works; the page asks for a new one each time it opens a job.
LINK_TTL_S = 900
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass(frozen=True)
class Link:
    url: str
    expires_at: int


def _signature(key_hash: str, key_id: str, resource: str, expires: int) -> str:
    message = f"{key_id}\n{resource}\n{expires}".encode()
    return hmac.new(key_hash.encode(), message, hashlib.sha256).hexdigest()


def _request_key(request: Request, session: Session) -> tuple[str, str]:
    """(id, stored hash) of the key the request authenticated with."""
    _, _, key = request.headers.get("authorization", "").partition(" ")
    row = session.execute(
        select(ApiKey.id, ApiKey.key_hash).where(
            ApiKey.key_hash == hash_key(key.strip()), ApiKey.revoked_at.is_(None)
        )
    ).one_or_none()
    session.commit()
    if row is None:  # revoked between the auth check and here
        raise ApiError(401, "the API key is not valid any more", code="invalid_api_key")
    return row.id, row.key_hash


def sign(request: Request, session: Session, context: ApiContext, url: URL, resource: str) -> Link:
    """A link to ``url`` (this API's, given by ``request.url_for``) for ``resource``, signed
    for the request's key; path and query only, so it works behind any host and scheme."""
    expires = int(time.time()) + LINK_TTL_S
    if context.settings.auth_enabled:
        key_id, key_hash = _request_key(request, session)
        url = url.include_query_params(
            k=key_id, exp=expires, sig=_signature(key_hash, key_id, resource, expires)
        )
    return Link(url=url.path + (f"?{url.query}" if url.query else ""), expires_at=expires)


def verify(
    request: Request,
    session: Session,
    context: ApiContext,
    resource: str,
    key_id: str | None,
    expires: int | None,
    signature: str | None,
) -> Principal:
    """Who the link was made for, or 403 (forged, expired, its key revoked)."""
    if not context.settings.auth_enabled:
        return auth.current_principal(request, context, session)  # loopback only
    now = time.time()
    if key_id is None or expires is None or signature is None:
        raise _refused("this link is not signed; open it from the dashboard")
    if expires < now:
        raise _refused("this link has expired; reopen the page for a new one", "link_expired")
    if expires > now + LINK_TTL_S + 60:
        raise _refused("this link's expiry is not one this API gives")
    row = session.execute(
        select(ApiKey.key_hash, ApiKey.tenant, ApiKey.operator, ApiKey.max_queued).where(
            ApiKey.id == key_id, ApiKey.revoked_at.is_(None)
        )
    ).one_or_none()
    session.commit()
    expected = _signature(row.key_hash, key_id, resource, expires) if row else ""
    if row is None or not hmac.compare_digest(expected, signature):
        raise _refused("this link's signature is not valid (or its key was revoked)")
    return Principal(row.tenant, bool(row.operator), row.max_queued)


def _refused(message: str, code: str = "invalid_signature") -> ApiError:
    return ApiError(403, message, code=code)


# --- streaming with ranges ---------------------------------------------------------------


def parse_range(header: str | None, size: int | None) -> tuple[int, int] | None:
    """(first, last) of a single ``bytes=`` range within ``size``; None: the whole object
    (no header, several ranges, or an unknown size). 416 when it is outside the object."""
    if not header or size is None:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if first == "" and last == "":
        return None
    if first == "":  # the last N bytes
        start, end = max(0, size - int(last)), size - 1
    else:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        raise ApiError(
            416,
            f"range {header!r} is outside the video's {size} bytes",
            code="range_not_satisfiable",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return start, end


def stream(
    context: ApiContext,
    key: str,
    size: int | None,
    media_type: str,
    range_header: str | None,
    filename: str,
) -> StreamingResponse:
    """The stored object ``key`` (``size`` bytes), whole or the one range asked for."""
    byte_range = parse_range(range_header, size)
    release = ReleaseOnce(context.take_download_slot())
    try:
        length, chunks = context.store.open(key, byte_range=byte_range)
    except ObjectMissing as err:
        release()
        raise ApiError.not_found("the video's content is no longer stored") from err
    except StorageUnavailable as err:
        release()
        raise ApiError(
            503, "storage is unavailable; retry later", code="storage_unavailable",
            headers={"Retry-After": "5"},
        ) from err  # fmt: skip

    def body() -> Iterator[bytes]:
        try:
            yield from chunks
        finally:
            release()

    headers = {
        "Accept-Ranges": "bytes",
        "Cache-Control": "private, no-store",
        "Content-Disposition": f'inline; filename="{filename}"',
    }
    if length is not None:
        headers["Content-Length"] = str(length)
    status = 200
    if byte_range is not None:
        status = 206
        headers["Content-Range"] = f"bytes {byte_range[0]}-{byte_range[1]}/{size}"
    return StreamingResponse(
        body(),
        status_code=status,
        media_type=media_type,
        headers=headers,
        background=BackgroundTask(release),
    )
