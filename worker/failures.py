"""How a failed render leaves the worker: :class:`RenderFailed`, which ends the Celery task
as a FAILURE naming the error code. Its own module (no torch, no runner), so the Celery
parent can know it without importing the engine."""

from __future__ import annotations


class RenderFailed(Exception):
    """The job failed for good (the row says ``failed`` with this ``code``). Raised by the
    runner so that the render task ends as a Celery FAILURE that names the error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)  # both in args: pickles to the parent, shown by repr
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"
