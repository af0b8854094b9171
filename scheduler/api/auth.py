"""API keys: ``Authorization: Bearer fvb-...``, stored as sha256, one tenant per key.

A key is shown once, when :func:`create_api_key` makes it; the database keeps only its hash
and a short prefix to recognise it by. An operator key (``fvb keys create --operator``) may
also read ``/metrics``. A revoked key stops working at its next request: every request looks
its key up.

Wrong keys are throttled per client address (:class:`FailedAuthLimiter`): past
``auth_failures_per_minute`` an address gets 429 before its key is even looked up.

With ``auth_enabled = False`` every request is the tenant ``"default"`` with operator rights,
and only requests that arrive on a loopback address from a loopback address are served:
``create_app`` checks the configured host, and this checks the socket each request really
came in on, so ``uvicorn --host 0.0.0.0`` cannot open the API to the network.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from scheduler.api.context import ApiContext, get_context
from scheduler.api.errors import ApiError
from scheduler.db.models import ApiKey
from scheduler.db.session import session_scope
from scheduler.net import is_loopback

KEY_PREFIX = "fvb-"
DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class Principal:
    """Who a request acts for."""

    tenant: str
    operator: bool = False


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(
    session: Session, tenant: str, name: str | None = None, operator: bool = False
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
        )
    )
    session.flush()
    return key


def principal_for_key(session: Session, key: str) -> Principal | None:
    """Who a live (not revoked) key acts for, or None."""
    row = session.execute(
        select(ApiKey.tenant, ApiKey.operator).where(
            ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)
        )
    ).one_or_none()
    return Principal(row.tenant, bool(row.operator)) if row is not None else None


class FailedAuthLimiter:
    """At most ``limit`` wrong keys per client address in any ``window_s`` seconds.

    Memory is bounded: the least recently seen of more than ``max_addresses`` addresses is
    forgotten (an attacker with that many addresses is a job for the network, not for us).
    """

    def __init__(self, limit: int, window_s: float = 60.0, max_addresses: int = 10_000) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, address: str) -> float | None:
        """Seconds until ``address`` may try again, or None when it may now."""
        if self.limit <= 0:
            return None
        now = time.monotonic()
        with self._lock:
            failures = self._failures.get(address)
            if failures is None:
                return None
            while failures and failures[0] <= now - self.window_s:
                failures.popleft()
            if len(failures) < self.limit:
                return None
            return failures[0] + self.window_s - now

    def record_failure(self, address: str) -> None:
        if self.limit <= 0:
            return
        with self._lock:
            failures = self._failures.pop(address, None) or deque(maxlen=self.limit)
            failures.append(time.monotonic())
            self._failures[address] = failures
            while len(self._failures) > self.max_addresses:
                self._failures.popitem(last=False)


def _unauthorized(message: str) -> ApiError:
    return ApiError(
        401, message, code="invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="fvb"'}
    )


def _client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _require_loopback(request: Request) -> None:
    """Without auth, serve only what came in on loopback from loopback."""
    server = request.scope.get("server")
    local = server[0] if server else None
    remote = request.client.host if request.client else None
    if not (local and remote and is_loopback(local) and is_loopback(remote)):
        raise ApiError(
            403,
            f"auth is disabled (FVB_AUTH_ENABLED=false), so this API answers only on a loopback "
            f"address; this request came from {remote} to {local}. Enable auth to serve the "
            "network.",
            code="loopback_only",
        )


def current_principal(
    request: Request, context: Annotated[ApiContext, Depends(get_context)]
) -> Principal:
    """FastAPI dependency: who the request acts for, or 401 (429 after too many wrong keys)."""
    if not context.settings.auth_enabled:
        _require_loopback(request)
        return Principal(DEFAULT_TENANT, operator=True)
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise _unauthorized(
            "Missing API key: send it as 'Authorization: Bearer <key>' (create one with "
            "'fvb keys create')."
        )
    address = _client_address(request)
    wait = context.auth_limiter.retry_after(address)
    if wait is not None:
        raise ApiError(
            429,
            f"Too many requests with a wrong API key from {address}; retry in {math.ceil(wait)} s.",
            code="too_many_auth_failures",
            headers={"Retry-After": str(math.ceil(wait))},
        )
    with session_scope(context.settings.database_url) as session:
        principal = principal_for_key(session, key)
    if principal is None:
        context.auth_limiter.record_failure(address)
        shown = key[:8] + "..." if len(key) > 8 else "..."
        raise _unauthorized(f"Incorrect API key provided: {shown} (unknown or revoked).")
    return principal


def optional_principal(request: Request, context: ApiContext) -> Principal | None:
    """Who sent the request if it carries a live key (or auth is off on loopback); None
    otherwise. For routes anyone may call that say more to operators; never raises."""
    try:
        return current_principal(request, context)
    except ApiError:
        return None


def current_tenant(principal: Annotated[Principal, Depends(current_principal)]) -> str:
    return principal.tenant


def current_operator(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
    """FastAPI dependency: an operator, or 403."""
    if not principal.operator:
        raise ApiError(
            403,
            "This route needs an operator key (create one with 'fvb keys create --operator').",
            code="operator_key_required",
        )
    return principal


Tenant = Annotated[str, Depends(current_tenant)]
Operator = Annotated[Principal, Depends(current_operator)]
