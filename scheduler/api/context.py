"""What every request handler needs, built once by ``create_app``: settings, served models,
the video store. Handlers get it through the :func:`get_context` dependency."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from fastapi import Request

from scheduler.models_config import ServedModel
from scheduler.settings import Settings
from scheduler.storage import StorageUnavailable, VideoStore

log = logging.getLogger(__name__)


@dataclass
class ApiContext:
    settings: Settings
    models: dict[str, ServedModel]
    store: VideoStore
    #: When the models config was read (the ``created`` of every model object).
    models_loaded_at: int = 0
    _bucket_ready: bool = field(default=False, repr=False)
    _bucket_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

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
