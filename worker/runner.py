"""Run one claimed job: pipeline -> frames -> mp4 -> S3 -> one guarded UPDATE.

The GPU part (:meth:`JobRunner.run`) and the finishing part (encode, hash, upload, record:
:meth:`JobRunner.finish`) are split, and the second runs on a small background executor, so
the GPU starts the next job while the previous one is still uploading. The attempt keeps
heart-beating until its finishing part is done, so the reaper never takes a job away from an
upload that is still going.

Outcomes (each a guarded transition named by the attempt, see ``scheduler/db/transitions.py``):

- succeeded: the objects are at ``video_key``/``sidecar_key`` of the attempt, and the row
  records them in the same UPDATE that sets ``succeeded``. If that UPDATE matches no row (a
  newer attempt won, or the job was cancelled), the attempt deletes what it uploaded.
- failed, with ``error_code`` one of: ``invalid_params`` (the engine refused the request),
  ``model_load_failed``, ``out_of_memory``, ``storage_unavailable`` (the store stayed down
  through the whole retry budget), ``internal_error`` (anything else; the message names the
  exception type).
- cancelled: the step callback saw ``cancel_requested``; nothing is left in the store.
- nothing at all, when the attempt found it no longer owns the job (the reaper requeued it):
  the row belongs to another attempt now.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from botocore.exceptions import BotoCoreError, ClientError
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import InterfaceError, OperationalError

from fastvideo.executor import RankGroupError
from fastvideo.pipelines.pipeline_batch_info import GenerationCancelled
from fastvideo.utils.video_io import frames_to_uint8, write_mp4
from scheduler.db import transitions
from scheduler.db.session import session_scope
from scheduler.models_config import ServedModel, load_models_config
from scheduler.settings import Settings
from scheduler.storage import (
    StorageUnavailable,
    VideoStore,
    sha256_file,
    sidecar_key,
    video_key,
)
from worker.heartbeat import AttemptLiveness
from worker.pipeline_cache import PipelineCache

log = logging.getLogger(__name__)

#: Errors another try may fix: the store or the database was briefly unreachable.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    StorageUnavailable,
    OperationalError,
    InterfaceError,
    BrokerError,
    ConnectionError,
    TimeoutError,
)
DB_ERRORS: tuple[type[BaseException], ...] = (OperationalError, InterfaceError)

#: Finished renders waiting for or in encode+upload; a third render waits for a slot.
MAX_FINISHING = 2

#: Job.params keys passed to ``generate_video`` as they are (``prompt`` is checked apart).
GENERATE_PARAMS = (
    "negative_prompt",
    "height",
    "width",
    "num_frames",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "fps",
)

T = TypeVar("T")


class AttemptStopped(Exception):
    """The attempt was cancelled or lost the job while waiting to retry."""


def make_worker_id(settings: Settings) -> str:
    """``hostname:pid:gpus`` of the process that runs jobs (the pool child)."""
    group = settings.worker_gpus or settings.worker_device or "auto"
    return f"{socket.gethostname()}:{os.getpid()}:{group}"


def retry_transient(
    settings: Settings,
    what: str,
    fn: Callable[[], T],
    *,
    errors: tuple[type[BaseException], ...] = TRANSIENT_ERRORS,
    should_stop: Callable[[], bool] | None = None,
) -> T:
    """Call ``fn``; on a transient error try again with exponential backoff, up to
    ``storage_retry_attempts`` tries in all, then re-raise the last error."""
    tries = max(1, settings.storage_retry_attempts)
    for number in range(1, tries + 1):
        try:
            return fn()
        except errors as err:
            if number == tries:
                log.error("%s failed on try %d/%d, giving up: %s", what, number, tries, err)
                raise
            delay = min(
                settings.storage_retry_max_s, settings.storage_retry_base_s * 2 ** (number - 1)
            )
            log.warning(
                "%s failed on try %d/%d, retrying in %.2fs: %s", what, number, tries, delay, err
            )
            time.sleep(delay)
            if should_stop is not None and should_stop():
                raise AttemptStopped(what) from err
    raise AssertionError("unreachable")


def generation_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    prompt = params.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError(f"params.prompt must be a string, got {type(prompt).__name__}")
    kwargs = {key: params[key] for key in GENERATE_PARAMS if params.get(key) is not None}
    return {"prompt": prompt, **kwargs}


@dataclass
class Rendered:
    """What the GPU part hands to the finishing part."""

    claim: transitions.Claim
    liveness: AttemptLiveness
    frames: np.ndarray  # (T, H, W, 3) uint8
    fps: int
    seed: int
    claimed_at: float  # time.monotonic()
    timings: dict[str, float] = field(default_factory=dict)


class JobRunner:
    """One per process that owns a GPU group; runs that process's jobs one after another."""

    def __init__(self, settings: Settings, worker_id: str | None = None) -> None:
        self.settings = settings
        self.worker_id = worker_id or make_worker_id(settings)
        self.pipelines = PipelineCache(
            settings.pipeline_cache_size, settings.worker_device, settings.worker_gpus
        )
        self.store = VideoStore(settings)
        self._models: dict[str, ServedModel] = {}
        self._finishing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fvb-finish")
        self._slots = threading.BoundedSemaphore(MAX_FINISHING)
        self._in_flight: set[Future[str]] = set()
        self._lock = threading.Lock()

    # -- the GPU part ------------------------------------------------------------------------

    def claim(self, job_id: str) -> transitions.Claim | None:
        """Raises a DB error when the database is unreachable (the task retries later)."""
        with session_scope(self.settings.database_url) as session:
            return transitions.claim(session, job_id, self.worker_id)

    def run(self, job_id: str) -> str:
        """Claim and render ``job_id``; hand the frames to the finishing executor.

        Returns what happened, for the log: ``skipped`` (not claimable: finished, cancelled or
        owned by a live attempt), ``rendered`` (finishing in the background), ``cancelled``,
        ``lost`` or ``failed:<code>``.
        """
        claim = self.claim(job_id)
        if claim is None:
            log.info("job %s: not claimable (finished, cancelled or owned), skipping", job_id)
            return "skipped"
        log.info("job %s: claimed attempt %d as %s", job_id, claim.attempt, self.worker_id)
        liveness = AttemptLiveness(self.settings, job_id, claim.attempt).start()
        handed_off = False
        try:
            outcome = self._render(claim, liveness)
            if isinstance(outcome, Rendered):
                self._hand_off(outcome)
                handed_off = True
                return "rendered"
            return outcome
        finally:
            if not handed_off:
                liveness.stop()

    def _render(self, claim: transitions.Claim, liveness: AttemptLiveness) -> Rendered | str:
        claimed_at = time.monotonic()
        timings: dict[str, float] = {}
        try:
            model = self._model(claim.model)
            started = time.perf_counter()
            generator = self.pipelines.get(model)
            timings["pipeline_load"] = time.perf_counter() - started
        except Exception as err:
            log.exception("job %s: loading model %r failed", claim.job_id, claim.model)
            return self._fail(claim, "model_load_failed", f"{type(err).__name__}: {err}")
        if liveness.should_stop:
            return self._stop(claim, liveness)
        try:
            kwargs = generation_kwargs(claim.params)
            image = self._input_image(claim, liveness)
            started = time.perf_counter()
            result = generator.generate_video(
                **kwargs, image=image, return_frames=True, callback=liveness.on_step
            )
            timings["generate"] = time.perf_counter() - started
        except (GenerationCancelled, AttemptStopped):
            return self._stop(claim, liveness)
        except StorageUnavailable as err:
            return self._fail(claim, "storage_unavailable", str(err))
        except ValueError as err:
            return self._fail(claim, "invalid_params", str(err))
        except torch.cuda.OutOfMemoryError as err:
            torch.cuda.empty_cache()
            return self._fail(claim, "out_of_memory", str(err))
        except RankGroupError as err:
            # A rank of a multi-GPU model died or hung; the group restarts for the next job.
            # The rank's log tail goes to this log, the job gets the line that names the rank.
            log.error("job %s: %s", claim.job_id, err)
            return self._fail(
                claim, "internal_error", f"RankGroupError: {str(err).splitlines()[0]}"
            )
        except Exception as err:
            log.exception("job %s: rendering failed", claim.job_id)
            return self._fail(claim, "internal_error", f"{type(err).__name__}: {err}")
        if liveness.should_stop:
            return self._stop(claim, liveness)
        timings.update(result.stage_timings)
        log.info(
            "job %s: rendered %d frames %dx%d in %.2fs (steps done: %d)",
            claim.job_id,
            result.num_frames,
            result.width,
            result.height,
            timings["generate"],
            liveness.last_step,
        )
        return Rendered(
            claim=claim,
            liveness=liveness,
            frames=frames_to_uint8(result.frames),
            fps=result.fps,
            seed=result.seed,
            claimed_at=claimed_at,
            timings=timings,
        )

    def _model(self, name: str) -> ServedModel:
        if name not in self._models:  # a model added to the config since we last read it
            self._models = load_models_config(self.settings.models_config)
        if name not in self._models:
            raise LookupError(f"model {name!r} is not in {self.settings.models_config}")
        return self._models[name]

    def _input_image(self, claim: transitions.Claim, liveness: AttemptLiveness) -> Any:
        """The image-to-video input (a PNG the API stored), as a PIL image; None for T2V."""
        key = claim.params.get("input_image_key")
        if not key:
            return None

        def fetch() -> bytes:
            try:
                response = self.store.client.get_object(Bucket=self.store.bucket, Key=key)
                return response["Body"].read()
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                    raise ValueError(f"input image {key!r} does not exist") from None
                raise StorageUnavailable(f"storage download of {key} failed: {err}") from err
            except BotoCoreError as err:
                raise StorageUnavailable(f"storage download of {key} failed: {err}") from err

        data = retry_transient(
            self.settings,
            f"job {claim.job_id} download of {key}",
            fetch,
            errors=(StorageUnavailable,),
            should_stop=lambda: liveness.should_stop,
        )
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
        except OSError as err:
            raise ValueError(f"input image {key!r} is not a readable image ({err})") from None

    def _hand_off(self, rendered: Rendered) -> None:
        # Blocks while MAX_FINISHING renders are still encoding/uploading: the GPU may run at
        # most that far ahead of the store.
        self._slots.acquire()
        try:
            future = self._finishing.submit(self.finish, rendered)
        except BaseException:
            self._slots.release()
            rendered.liveness.stop()
            raise
        with self._lock:
            self._in_flight.add(future)
        future.add_done_callback(self._finished)

    def _finished(self, future: Future[str]) -> None:
        with self._lock:
            self._in_flight.discard(future)
        self._slots.release()

    # -- the finishing part (background thread) ----------------------------------------------

    def finish(self, rendered: Rendered) -> str:
        claim, liveness = rendered.claim, rendered.liveness
        try:
            try:
                outcome = self._store_and_record(rendered)
            except Exception as err:
                log.exception("job %s: finishing attempt %d failed", claim.job_id, claim.attempt)
                outcome = self._fail(claim, "internal_error", f"{type(err).__name__}: {err}")
        except Exception:
            # Nobody reads this thread's result: log, and let the reaper requeue the job
            # once the heartbeat below has stopped.
            log.exception("job %s: could not record attempt %d", claim.job_id, claim.attempt)
            outcome = "unrecorded"
        finally:
            liveness.stop()
        log.info("job %s attempt %d: %s", claim.job_id, claim.attempt, outcome)
        return outcome

    def _store_and_record(self, rendered: Rendered) -> str:
        claim, liveness, timings = rendered.claim, rendered.liveness, rendered.timings
        if liveness.should_stop:
            return self._stop(claim, liveness)
        key = video_key(claim.job_id, claim.attempt)
        side_key = sidecar_key(claim.job_id, claim.attempt)
        with tempfile.TemporaryDirectory(prefix="fvb-encode-") as tmp:
            path = Path(tmp) / "video.mp4"
            started = time.perf_counter()
            write_mp4(rendered.frames, path, fps=rendered.fps)
            timings["mp4_encode"] = time.perf_counter() - started
            started = time.perf_counter()
            digest = sha256_file(path)
            size = path.stat().st_size
            timings["sha256"] = time.perf_counter() - started
            try:
                started = time.perf_counter()
                retry_transient(
                    self.settings,
                    f"job {claim.job_id} upload of {key}",
                    lambda: self.store.upload_video(path, key, digest),
                    errors=(StorageUnavailable,),
                    should_stop=lambda: liveness.should_stop,
                )
                timings["upload"] = time.perf_counter() - started
                timings["total"] = time.monotonic() - rendered.claimed_at
                sidecar = self._sidecar(rendered, key, size, digest)
                retry_transient(
                    self.settings,
                    f"job {claim.job_id} upload of {side_key}",
                    lambda: self.store.put_json(side_key, sidecar),
                    errors=(StorageUnavailable,),
                    should_stop=lambda: liveness.should_stop,
                )
            except StorageUnavailable as err:
                tries = self.settings.storage_retry_attempts
                outcome = self._fail(
                    claim, "storage_unavailable", f"{err} (gave up after {tries} tries)"
                )
                # Record first: the store is down, so this one try is likely to fail too.
                self._delete(key, side_key, retry=False)
                return outcome
            except AttemptStopped:
                self._delete(key, side_key)
                return self._stop(claim, liveness)
        # A cancel that came in during the upload wins over the upload.
        liveness.check()
        if liveness.should_stop:
            self._delete(key, side_key)
            return self._stop(claim, liveness)

        def record() -> bool:
            with session_scope(self.settings.database_url) as session:
                return transitions.succeed(
                    session,
                    claim.job_id,
                    claim.attempt,
                    output_key=key,
                    output_bytes=size,
                    output_sha256=digest,
                    stage_timings={k: round(v, 4) for k, v in timings.items()},
                )

        try:
            won = retry_transient(
                self.settings, f"job {claim.job_id} recording success", record, errors=DB_ERRORS
            )
        except DB_ERRORS:
            # The commit may or may not have happened: keep the objects. If it did not, the
            # heartbeat stops with this thread and the reaper requeues the job.
            return "unrecorded"
        if not won:
            # Either a cancel arrived after the last step (the row is still ours: finish the
            # cancel) or a newer attempt owns the job. Both ways the objects must go.
            self._delete(key, side_key)
            with session_scope(self.settings.database_url) as session:
                cancelled = transitions.finish_cancelled(session, claim.job_id, claim.attempt)
            log.warning(
                "job %s attempt %d: %s before recording success; deleted its objects",
                claim.job_id,
                claim.attempt,
                "cancelled" if cancelled else "superseded",
            )
            return "cancelled" if cancelled else "superseded"
        return "succeeded"

    def _sidecar(self, rendered: Rendered, key: str, size: int, digest: str) -> dict[str, Any]:
        claim = rendered.claim
        frames = rendered.frames
        return {
            "job_id": claim.job_id,
            "attempt": claim.attempt,
            "model": claim.model,
            "params": claim.params,
            "seed": rendered.seed,
            "worker_id": self.worker_id,
            "timings": {k: round(v, 4) for k, v in rendered.timings.items()},
            "video": {
                "key": key,
                "bytes": size,
                "sha256": digest,
                "num_frames": int(frames.shape[0]),
                "height": int(frames.shape[1]),
                "width": int(frames.shape[2]),
                "fps": rendered.fps,
            },
            "created_at": datetime.now(UTC).isoformat(),
        }

    def _delete(self, *keys: str, retry: bool = True) -> None:
        """Best effort: S3 deletes of missing keys succeed, so delete every key the attempt
        may have written (an upload can land even when its reply was lost)."""
        try:
            if retry:
                retry_transient(
                    self.settings,
                    f"delete of {', '.join(keys)}",
                    lambda: self.store.delete(*keys),
                    errors=(StorageUnavailable,),
                )
            else:
                self.store.delete(*keys)
        except StorageUnavailable:
            log.error("could not delete %s; left in the store", ", ".join(keys))

    # -- guarded transitions -----------------------------------------------------------------

    def _fail(self, claim: transitions.Claim, code: str, message: str) -> str:
        log.warning("job %s attempt %d failed (%s): %s", claim.job_id, claim.attempt, code, message)

        def record() -> bool:
            with session_scope(self.settings.database_url) as session:
                return transitions.fail(session, claim.job_id, claim.attempt, code, message)

        try:
            if not retry_transient(
                self.settings, f"job {claim.job_id} recording failure", record, errors=DB_ERRORS
            ):
                return "lost"
        except DB_ERRORS:
            return "unrecorded"
        return f"failed:{code}"

    def _stop(self, claim: transitions.Claim, liveness: AttemptLiveness) -> str:
        if liveness.lost:
            log.warning("job %s attempt %d: lost the job, stopping", claim.job_id, claim.attempt)
            return "lost"

        def record() -> bool:
            with session_scope(self.settings.database_url) as session:
                return transitions.finish_cancelled(session, claim.job_id, claim.attempt)

        try:
            won = retry_transient(
                self.settings, f"job {claim.job_id} recording cancel", record, errors=DB_ERRORS
            )
        except DB_ERRORS:
            return "unrecorded"
        log.info(
            "job %s attempt %d: cancelled after step %d",
            claim.job_id,
            claim.attempt,
            liveness.last_step,
        )
        return "cancelled" if won else "lost"

    # -- shutdown ----------------------------------------------------------------------------

    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def drain(self) -> None:
        """Wait for every render handed to the finishing executor to be stored and recorded."""
        pending = self.in_flight()
        if pending:
            log.info("waiting for %d upload(s) to finish before exiting", pending)
        self._finishing.shutdown(wait=True)
        # Stops the rank processes of multi-GPU models (a pool child exits without atexit).
        self.pipelines.close()
