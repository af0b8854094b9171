"""A release (a download slot given back) that several places may call, run once: the
streamed body's end and the background task that runs when the client went away."""

from __future__ import annotations

import threading
from collections.abc import Callable


class ReleaseOnce:
    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            release, self._release = self._release, None
        if release is not None:
            release()
