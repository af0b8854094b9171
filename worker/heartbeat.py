"""Liveness of one claimed attempt: a heartbeat thread, and the per-step progress callback.

The reaper requeues a running job whose ``heartbeat_at`` goes stale, so a worker must beat for
as long as it owns the attempt: from the claim, through pipeline load and denoising, until the
upload and the final guarded UPDATE are done. Both writers here name the attempt, so a beat
from an attempt that lost the job (requeued, or cancelled and finished) matches no row and
tells us to stop.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from fvb_core.db import transitions
from fvb_core.db.session import session_scope
from fvb_core.settings import Settings

if TYPE_CHECKING:
    from fastvideo.pipelines.pipeline_batch_info import StepProgress

log = logging.getLogger(__name__)

#: Denoising maps to 0..DENOISE_PROGRESS; the rest (decode, encode, upload) ends at 100.
DENOISE_PROGRESS = 95


def step_progress(step: int, num_steps: int) -> int:
    return step * DENOISE_PROGRESS // max(1, num_steps)


class AttemptLiveness:
    """Heart-beats one attempt and remembers what the database said about it."""

    def __init__(self, settings: Settings, job_id: str, attempt: int) -> None:
        self.settings = settings
        self.job_id = job_id
        self.attempt = attempt
        self.cancel_requested = False
        self.lost = False
        self.last_step = 0
        self._last_progress_at = float("-inf")
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, name=f"heartbeat-{job_id}-{attempt}", daemon=True
        )

    @property
    def should_stop(self) -> bool:
        return self.cancel_requested or self.lost

    def start(self) -> AttemptLiveness:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not threading.current_thread() and self._thread.is_alive():
            self._thread.join(timeout=10)

    def _beat(self) -> None:
        while not self._stopped.wait(self.settings.heartbeat_interval_s):
            self.beat()

    def beat(self, progress: int | None = None) -> None:
        """One guarded heartbeat; database errors are logged, not raised (the next one retries,
        and the reaper decides if they go on for too long)."""
        try:
            with session_scope(self.settings.database_url) as session:
                result = transitions.heartbeat(session, self.job_id, self.attempt, progress)
        except SQLAlchemyError as err:
            log.warning("heartbeat for %s attempt %d failed: %s", self.job_id, self.attempt, err)
            return
        self._observe(result.still_owner, result.cancel_requested)

    def check(self) -> None:
        """Read-only: is the attempt still ours, and has a cancel been asked for?"""
        try:
            with session_scope(self.settings.database_url) as session:
                result = transitions.ownership(session, self.job_id, self.attempt)
        except SQLAlchemyError as err:
            log.warning("cancel check for %s failed: %s", self.job_id, err)
            return
        self._observe(result.still_owner, result.cancel_requested)

    def _observe(self, still_owner: bool, cancel_requested: bool) -> None:
        if not still_owner and not self.lost:
            # Also what the last beat after our own final transition sees: not an error here.
            log.info(
                "job %s attempt %d is no longer running as this attempt", self.job_id, self.attempt
            )
        if cancel_requested and not self.cancel_requested:
            log.info("job %s attempt %d: cancel requested", self.job_id, self.attempt)
        self.lost = self.lost or not still_owner
        self.cancel_requested = self.cancel_requested or cancel_requested

    def on_step(self, progress: StepProgress) -> bool:
        """The engine's step callback: report progress (throttled), return True to stop.

        Whether to stop is read from the database after every step, so a cancel takes effect
        within one step of being committed. A step of a real model takes far longer than this
        primary-key read; the progress write is what the throttle saves.
        """
        self.last_step = progress.step
        now = time.monotonic()
        last = progress.step >= progress.num_steps
        percent = step_progress(progress.step, progress.num_steps)
        wrote = last or now - self._last_progress_at >= self.settings.progress_min_interval_s
        if wrote:
            self._last_progress_at = now
            self.beat(percent)
        else:
            self.check()
        if self.should_stop and not wrote:
            # Record where we stopped, so progress shows how far the attempt got.
            self.beat(percent)
        return self.should_stop
