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

import math
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from fvb_core.api_keys import Principal, principal_for_key
from fvb_core.net import is_loopback
from scheduler.api.context import ApiContext, get_context
from scheduler.api.errors import ApiError
from scheduler.api.session import SessionDep

DEFAULT_TENANT = "default"


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
    request: Request, context: Annotated[ApiContext, Depends(get_context)], session: SessionDep
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
    principal = principal_for_key(session, key)
    session.commit()  # a read: no transaction stays open behind the route
    if principal is None:
        context.auth_limiter.record_failure(address)
        shown = key[:8] + "..." if len(key) > 8 else "..."
        raise _unauthorized(f"Incorrect API key provided: {shown} (unknown or revoked).")
    return principal


def optional_principal(request: Request, context: ApiContext, session: Session) -> Principal | None:
    """Who sent the request if it carries a live key (or auth is off on loopback); None
    otherwise. For routes anyone may call that say more to operators; never raises."""
    try:
        return current_principal(request, context, session)
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
CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
Operator = Annotated[Principal, Depends(current_operator)]
