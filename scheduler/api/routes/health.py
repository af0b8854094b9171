"""Liveness, readiness and Prometheus metrics (no auth: probes and scrapers call these)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from scheduler.api.context import ApiContext, get_context
from scheduler.api.errors import error_body
from scheduler.api.readiness import run_checks

router = APIRouter(tags=["health"])

Context = Annotated[ApiContext, Depends(get_context)]


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
def readyz(context: Context) -> JSONResponse:
    checks = run_checks(context)
    down = [name for name, result in checks.items() if result != "ok"]
    if not down:
        return JSONResponse({"status": "ready", "checks": checks})
    body = error_body(503, f"not ready: {', '.join(down)} down", code="not_ready")
    body.update(status="not_ready", checks=checks)
    return JSONResponse(body, 503)


@router.get("/metrics", response_model=None)
def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
