"""The API application: ``create_app(settings)``.

Run it with ``uvicorn --factory scheduler.api.app:create_app`` (settings from ``FVB_*``).
Start-up reads the models config once (a missing or broken one is an error here, not at the
first request) and creates the bucket if storage is up; if it is down the app still starts
and ``/readyz`` says so.
"""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI

from fvb_core.models_config import load_models_config
from fvb_core.net import is_loopback
from fvb_core.settings import Settings, get_settings
from fvb_core.storage import VideoStore
from scheduler.api.context import ApiContext
from scheduler.api.errors import RequestMiddleware, install_error_handlers
from scheduler.api.metrics import Metrics, MetricsMiddleware
from scheduler.api.routes import batches, dashboard, health, models, videos, webhooks

log = logging.getLogger(__name__)


class ConfigurationError(RuntimeError):
    """The settings do not describe an API that may start."""


def _load_models(settings: Settings):
    try:
        return load_models_config(settings.models_config)
    except (ValueError, OSError) as err:
        raise ConfigurationError(f"cannot start the API: {err}") from err


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    if not settings.auth_enabled and not is_loopback(settings.api_host):
        raise ConfigurationError(
            f"auth is disabled (FVB_AUTH_ENABLED=false) but the API would listen on "
            f"{settings.api_host!r}: without auth it may only listen on a loopback address "
            "(127.0.0.1, ::1, localhost). Requests that reach it on any other address are "
            "refused too (scheduler/api/auth.py)."
        )
    served = _load_models(settings)
    context = ApiContext(
        settings=settings,
        models=served,
        # Request threads must not wait on a hung store for boto3's default 30 s.
        store=VideoStore(
            settings,
            connect_timeout_s=min(3.0, settings.request_store_timeout_s),
            read_timeout_s=settings.request_store_timeout_s,
        ),
        models_loaded_at=int(settings.models_config.stat().st_mtime or time.time()),
    )
    context.try_ensure_bucket()  # storage may be down now; /readyz tells, requests retry

    app = FastAPI(
        title="FastVideo Batch",
        summary="OpenAI Videos compatible API of the FastVideo batch rendering service",
        version="0.1.0",
    )
    app.state.context = context
    app.state.metrics = Metrics(context)
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(RequestMiddleware)  # last added is outermost: ids on every answer
    app.include_router(videos.router)
    app.include_router(batches.router)
    app.include_router(webhooks.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(dashboard.router)
    log.info("API ready to serve %d model(s): %s", len(served), ", ".join(sorted(served)))
    return app
