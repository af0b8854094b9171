"""What every request handler needs, built once by ``create_app``: settings, served models,
the video store. Handlers get it through the :func:`get_context` dependency."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request

from fvb_core.models_config import ServedModel
from fvb_core.settings import Settings
from fvb_core.storage import StorageUnavailable, VideoStore
from scheduler.api.errors import ApiError
from scheduler.api.throttle import FailedAuthLimiter

log = logging.getLogger(__name__)


@dataclass
class ApiContext:
    settings: Settings
    models: dict[str, ServedModel]
    store: VideoStore
    #: When the models config was read (the ``created`` of every model object).
    models_loaded_at: int = 0
    auth_limiter: FailedAuthLimiter = field(default=None, repr=False)  # type: ignore[assignment]
    _bucket_ready: bool = field(default=False, repr=False)
    _bucket_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _download_slots: threading.BoundedSemaphore = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.auth_limiter is None:
            self.auth_limiter = FailedAuthLimiter(self.settings.auth_failures_per_minute)
        self._download_slots = threading.BoundedSemaphore(self.settings.max_concurrent_downloads)

    def take_download_slot(self) -> Callable[[], None]:
        """One of ``max_concurrent_downloads`` slots, or 503 at once; returns its release
        (called when the streamed body ends, which is after the route has returned)."""
        if not self._download_slots.acquire(blocking=False):
            raise ApiError(
                503,
                f"{self.settings.max_concurrent_downloads} downloads are already in progress; "
                "retry shortly",
                code="too_many_downloads",
                headers={"Retry-After": "2"},
            )
        return self._download_slots.release

    def ensure_bucket(self) -> None:
        """Create the bucket once; storage may have been down when the API started."""
        if self._bucket_ready:
            return
        with self._bucket_lock:
            if not self._bucket_ready:
                self.store.ensure_bucket()
                self._bucket_ready = True

    def try_ensure_bucket(self) -> bool:
        try:
            self.ensure_bucket()
        except StorageUnavailable as err:
            log.warning("storage not ready: %s", err)
            return False
        return True


def get_context(request: Request) -> ApiContext:
    return request.app.state.context
