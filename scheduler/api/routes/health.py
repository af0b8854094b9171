"""Liveness, readiness and Prometheus metrics.

``/healthz`` runs on the event loop itself (``async``, no I/O), so it answers even when every
worker thread of the API is stuck on a hung dependency. ``/readyz`` tells anonymous callers
(probes) only which dependency is down; an operator key also gets the reasons (they name
internal endpoints). ``/metrics`` needs an operator key (``fvb keys create --operator``);
Prometheus sends it with ``authorization: {credentials: <key>}`` in its scrape config.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from scheduler.api.auth import Operator, optional_principal
from scheduler.api.context import ApiContext, get_context
from scheduler.api.errors import error_body
from scheduler.api.openapi import errors
from scheduler.api.readiness import run_checks
from scheduler.api.schemas import Health
from scheduler.api.session import SessionDep

router = APIRouter(tags=["health"])

Context = Annotated[ApiContext, Depends(get_context)]


@router.get("/healthz", response_model=Health, response_model_exclude_none=True)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Health,
    responses={503: {"description": "A dependency (database, broker, storage) is down"}},
)
def readyz(request: Request, context: Context, session: SessionDep) -> JSONResponse:
    checks = run_checks(context)
    principal = optional_principal(request, context, session)
    if principal is None or not principal.operator:
        checks = {name: "ok" if result == "ok" else "down" for name, result in checks.items()}
    down = [name for name, result in checks.items() if result != "ok"]
    if not down:
        return JSONResponse({"status": "ready", "checks": checks})
    body = error_body(503, f"not ready: {', '.join(down)} down", code="not_ready")
    body.update(status="not_ready", checks=checks)
    return JSONResponse(body, 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"},
        **errors(401, 403, 429, 503),
    },
)
def metrics(request: Request, _operator: Operator) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
