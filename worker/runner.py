"""Run one claimed job: pipeline -> frames -> mp4 + previews -> S3 -> one guarded UPDATE.

The GPU part (:meth:`JobRunner.run`) and the finishing part (encode, previews, hash, upload,
record: :meth:`JobRunner.finish`) are split, and the second runs on a small background
executor, so the GPU starts the next job while the previous one is still uploading. A process
holds at most ``MAX_FINISHING`` claimed jobs (rendering or finishing): the next task waits
for a slot *before* it claims, so while uploads wait for the store the worker takes no new
message and claims no new job. The attempt keeps heart-beating until its finishing part is
done, so the reaper never takes a job away from an upload that is still going.

Objects of attempt *n* (see ``fvb_core/storage.py``): the video, its two previews (the first
frame as WebP, a JPEG grid of evenly spaced frames) and the JSON sidecar that describes all
three. They go together: wherever the runner deletes an attempt's objects (cancel,
superseded, failed upload) it deletes all four. A worker that claims attempt *n* > 1 first
deletes whatever earlier attempts of the job left in the store (a job is never claimed again
once final, so none of those is a recorded output).

Outages:

- The store down while finishing: the encoded files stay on local disk and the uploads are
  retried with capped exponential back-off for as long as the attempt owns the job and is not
  cancelled, up to ``storage_outage_max_s``; then the job goes back to the queue
  (``retry_later``), or fails with ``storage_unavailable`` on its last attempt.
- The store down while downloading an image-to-video input (bounded retries): the job goes
  back to the queue (``retry_later``).
- The database down while recording an outcome: the guarded UPDATE is retried with capped
  back-off and no try limit, until the database answers. If it then matches no row (a newer
  attempt won, or the job was cancelled) the attempt deletes its objects; if an earlier try
  had committed after all (only its reply was lost), the row already shows this attempt's
  outcome and nothing is deleted.

Outcomes (each a guarded transition named by the attempt, see ``fvb_core/db/transitions.py``):

- succeeded: the objects are at the attempt's keys, and the row records the video in the
  same UPDATE that sets ``succeeded``, with what only the worker knows (``Job.result``: the
  frames, fps and size rendered, the model's revision, the GPU) and the stage timings.
- failed, with ``error_code`` one of: ``invalid_params`` (the engine refused the request),
  ``model_load_failed``, ``out_of_memory``, ``storage_unavailable`` (the store stayed down past
  the outage limit on the job's last attempt), ``internal_error`` (anything else; the message
  names the exception type). :meth:`JobRunner.run` raises :class:`worker.tasks.RenderFailed`
  for a failure it recorded, so the Celery task ends as a FAILURE carrying the code.
- requeued: a transient store error (``retry_later``); the reaper dispatches the job again.
- cancelled: the step callback saw ``cancel_requested``; nothing is left in the store.
- nothing at all, when the attempt found it no longer owns the job (the reaper requeued it):
  the row belongs to another attempt now.
"""

from __future__ import annotations

import contextvars
import inspect
import io
import json
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
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from fastvideo.executor import RankGroupError
from fastvideo.pipelines.pipeline_batch_info import GenerationCancelled
from fastvideo.utils.video_io import frames_to_uint8, write_mp4
from fvb_core import logs
from fvb_core.db import fleet, transitions
from fvb_core.db.session import session_scope
from fvb_core.jobs import JobParams, JobResult
from fvb_core.models_config import ServedModel, load_models_config
from fvb_core.settings import Settings
from fvb_core.storage import (
    ObjectMissing,
    StorageUnavailable,
    StoredObject,
    VideoStore,
    attempt_keys,
    earlier_attempt_keys,
    job_prefixes,
    sha256_file,
    sidecar_key,
    video_key,
)
from worker.embedding_cache import NEGATIVE, PROMPT, EmbeddingCache, EmbeddingKey
from worker.failures import RenderFailed
from worker.heartbeat import AttemptLiveness
from worker.pipeline_cache import PipelineCache
from worker.previews import Preview, make_previews
from worker.retries import (
    DB_ERRORS,
    AttemptStopped,
    Outage,
    retry_transient,
    retry_until,
)

log = logging.getLogger(__name__)

#: Jobs one process holds claimed at once, from the claim to the recorded outcome: the one
#: rendering and the ones waiting for or in encode+upload. The next task waits for a slot
#: before it claims (and so before the worker takes another message).
MAX_FINISHING = 2

T = TypeVar("T")

#: The tokenizer length the engine encodes prompts with (``ForwardBatch.max_sequence_length``,
#: Wan's 512), passed to ``encode_prompt`` so that a cached embedding is what the render
#: would have computed.
MAX_SEQUENCE_LENGTH = 512


def gpu_name(device: str | None) -> str:
    """The GPU this process renders on (``torch.cuda.get_device_name()``), or "cpu"."""
    if device is not None and torch.device(device).type == "cpu":
        return "cpu"
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def make_worker_id(settings: Settings) -> str:
    """``hostname:pid:gpus`` of the process that runs jobs (the pool child)."""
    group = settings.worker_gpus or settings.worker_device or "auto"
    return f"{socket.gethostname()}:{os.getpid()}:{group}"


# -- objects of an attempt -------------------------------------------------------------------


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
    #: False when earlier attempts' objects could not be removed at the claim (store down).
    earlier_removed: bool = True
    #: ``PipelineCache.revision`` of the model that rendered it.
    model_revision: str | None = None


Outcome = str | RenderFailed


def describe(outcome: Outcome) -> str:
    return outcome if isinstance(outcome, str) else f"failed:{outcome.code}"


class JobRunner:
    """One per process that owns a GPU group; runs that process's jobs one after another."""

    def __init__(self, settings: Settings, worker_id: str | None = None) -> None:
        self.settings = settings
        self.worker_id = worker_id or make_worker_id(settings)
        #: The loaded models last written for the console (``_record_models``).
        self._recorded_models: list[str] | None = None
        self.pipelines = PipelineCache(
            settings.pipeline_cache_size, settings.worker_device, settings.worker_gpus
        )
        self.store = VideoStore(settings)
        #: Prompt embeddings reused by the next videos of the same text (on the CPU).
        self.embeddings = EmbeddingCache(settings.embedding_cache_bytes)
        self._gpu_name: str | None = None
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
        """:meth:`_run`, every line it logs (and the finishing thread's) carrying the job."""
        with logs.bound(job_id=job_id, worker_id=self.worker_id):
            return self._run(job_id)

    def _run(self, job_id: str) -> str:
        """Claim and render ``job_id``; hand the frames to the finishing executor.

        Returns what happened, for the log: ``skipped`` (not claimable: finished, cancelled or
        owned by a live attempt), ``rendered`` (finishing in the background), ``requeued``,
        ``cancelled`` or ``lost``. Raises :class:`RenderFailed` when it recorded a failure.
        """
        # Blocks while MAX_FINISHING jobs of this process are still rendering or finishing
        # (uploads waiting out a store outage): nothing is claimed, and the task does not
        # return, so the worker takes no further message either.
        if not self._slots.acquire(blocking=False):
            log.info("job %s: waiting for a finishing slot before claiming", job_id)
            self._slots.acquire()
        handed_off = False
        try:
            claim = self.claim(job_id)
            if claim is None:
                log.info("job %s: not claimable (finished, cancelled or owned), skipping", job_id)
                return "skipped"
            logs.bind(attempt=claim.attempt)  # undone with the job's context, in run()
            log.info("job %s: claimed attempt %d as %s", job_id, claim.attempt, self.worker_id)
            liveness = AttemptLiveness(self.settings, job_id, claim.attempt).start()
            try:
                earlier_removed = self._remove_earlier_attempts(claim)
                outcome = self._render(claim, liveness)
                if isinstance(outcome, Rendered):
                    outcome.earlier_removed = earlier_removed
                    self._hand_off(outcome)
                    handed_off = True
                    return "rendered"
                if isinstance(outcome, RenderFailed):
                    raise outcome
                return outcome
            finally:
                if not handed_off:
                    liveness.stop()
        finally:
            if not handed_off:
                self._slots.release()

    def _render(self, claim: transitions.Claim, liveness: AttemptLiveness) -> Rendered | Outcome:
        claimed_at = time.monotonic()
        timings: dict[str, float] = {}
        try:
            model = self._model(claim.model)
            started = time.perf_counter()
            generator = self.pipelines.get(model)
            timings["pipeline_load"] = time.perf_counter() - started
            self._record_models()
        except Exception as err:
            log.exception("job %s: loading model %r failed", claim.job_id, claim.model)
            return self._fail(claim, "model_load_failed", f"{type(err).__name__}: {err}")
        if liveness.should_stop:
            return self._stop(claim, liveness)
        try:
            kwargs = JobParams.from_json(claim.params).generation_kwargs()
            image = self._input_image(claim, liveness)
            revision = self.pipelines.revision(model)
            started = time.perf_counter()
            embeds = self._prompt_embeds(claim, model, revision, generator, kwargs)
            timings["text_encode"] = time.perf_counter() - started
            started = time.perf_counter()
            result = generator.generate_video(
                **kwargs,
                **embeds,
                image=image,
                return_frames=True,
                callback=liveness.on_step,
                progress=False,  # progress goes to the job row, not to the worker's log
            )
            timings["generate"] = time.perf_counter() - started
        except (GenerationCancelled, AttemptStopped):
            return self._stop(claim, liveness)
        except StorageUnavailable as err:
            # The input image could not be read from the store: another attempt may.
            return self._retry_later(claim, "storage_unavailable", str(err))
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
        # The manifest's names for the engine's stages (the stage names stay as well).
        timings["text_encode"] += timings.get("prompt_encoding_stage", 0.0)
        timings["denoise"] = timings.get("denoising_stage", 0.0)
        timings["decode"] = timings.get("decoding_stage", 0.0)
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
            model_revision=revision,
        )

    def _prompt_embeds(
        self,
        claim: transitions.Claim,
        model: ServedModel,
        revision: str,
        generator: Any,
        kwargs: dict[str, Any],
    ) -> dict[str, Any]:
        """``generate_video``'s ``prompt_embeds``/``negative_prompt_embeds`` for this job: from
        the embedding cache, or encoded now (only the texts the cache lacks) and kept there.
        Empty when the cache is off or the engine cannot encode on its own (then
        ``generate_video`` encodes the texts itself)."""
        encode = getattr(generator, "encode_prompt", None)
        if not self.embeddings.enabled or not callable(encode):
            return {}
        guidance = kwargs.get("guidance_scale")
        if guidance is None:  # not recorded: the engine's default decides
            default = inspect.signature(generator.generate_video).parameters["guidance_scale"]
            guidance = default.default
        guided = guidance > 1.0
        engine = json.dumps(
            {
                "gpus": model.gpus,
                "options": model.pipeline_options,
                "device": self.settings.worker_device,
            },
            sort_keys=True,
            default=str,
        )
        prompt, negative = kwargs["prompt"], kwargs.get("negative_prompt")

        def key(role: str, text: str | None) -> EmbeddingKey:
            return EmbeddingKey(model.name, revision, engine, role, text, MAX_SEQUENCE_LENGTH)

        prompt_embeds = self.embeddings.get(key(PROMPT, prompt))
        negative_embeds = self.embeddings.get(key(NEGATIVE, negative)) if guided else None
        missing = [
            role
            for role, found in ((PROMPT, prompt_embeds), (NEGATIVE, negative_embeds))
            if found is None and (role == PROMPT or guided)
        ]
        if missing:
            # Only the missing texts are encoded: embeddings passed in come back as they are.
            encoded, encoded_negative = encode(
                prompt,
                negative,
                do_classifier_free_guidance=guided,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_embeds,
            )
            if prompt_embeds is None:
                prompt_embeds = encoded
                self.embeddings.put(key(PROMPT, prompt), encoded)
            if guided and negative_embeds is None:
                negative_embeds = encoded_negative
                self.embeddings.put(key(NEGATIVE, negative), encoded_negative)
        log.info(
            "job %s: prompt embeddings %s (cache %s)",
            claim.job_id,
            f"encoded: {', '.join(missing)}" if missing else "reused",
            self.embeddings.counters(),
        )
        embeds = {"prompt_embeds": prompt_embeds}
        if negative_embeds is not None:
            embeds["negative_prompt_embeds"] = negative_embeds
        return embeds

    def _model(self, name: str) -> ServedModel:
        if name not in self._models:  # a model added to the config since we last read it
            self._models = load_models_config(self.settings.models_config)
        if name not in self._models:
            raise LookupError(f"model {name!r} is not in {self.settings.models_config}")
        return self._models[name]

    def _input_image(self, claim: transitions.Claim, liveness: AttemptLiveness) -> Any:
        """The image-to-video input (a PNG the API stored), as a PIL image; None for T2V."""
        key = JobParams.from_json(claim.params).input_image_key
        if not key:
            return None

        def fetch() -> bytes:
            try:
                return self.store.get_bytes(key)
            except ObjectMissing:
                raise ValueError(f"input image {key!r} does not exist") from None

        try:
            data = retry_transient(
                self.settings,
                f"job {claim.job_id} download of {key}",
                fetch,
                errors=(StorageUnavailable,),
                should_stop=lambda: liveness.should_stop,
            )
        except StorageUnavailable as err:
            tries = self.settings.storage_retry_attempts
            raise StorageUnavailable(
                f"download of {key}: {err} (gave up after {tries} tries)"
            ) from err
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
        except OSError as err:
            raise ValueError(f"input image {key!r} is not a readable image ({err})") from None

    def _remove_earlier_attempts(self, claim: transitions.Claim) -> bool:
        """Attempt n > 1: delete what attempts 1..n-1 left in the store (an attempt that
        uploaded, then died or gave up before recording). One try; False if the store did not
        answer (the finishing part tries again once its own uploads went through)."""
        if claim.attempt <= 1:
            return True
        try:
            keys = earlier_attempt_keys(
                self.store.list_keys(job_prefixes(claim.job_id)[0]), claim.job_id, claim.attempt
            )
            self.store.delete(*keys)
        except StorageUnavailable as err:
            log.warning(
                "job %s attempt %d: could not remove earlier attempts' objects yet: %s",
                claim.job_id,
                claim.attempt,
                err,
            )
            return False
        if keys:
            log.warning(
                "job %s attempt %d: removed %d object(s) of earlier attempts: %s",
                claim.job_id,
                claim.attempt,
                len(keys),
                ", ".join(keys),
            )
        return True

    def _record_models(self) -> None:
        """Tell the console which models this process holds, when that changed."""
        names = sorted(self.pipelines.names())
        if names == self._recorded_models:
            return
        try:
            with session_scope(self.settings.database_url) as session:
                fleet.record_models(session, self.worker_id, names)
            self._recorded_models = names
        except SQLAlchemyError as err:  # the console's figure waits for the next load
            log.warning("could not record the loaded models: %s", err)

    def _hand_off(self, rendered: Rendered) -> None:
        # The slot taken before the claim goes with the job; _finished gives it back.
        # The finishing thread logs in the job's context (its id, attempt, worker).
        future = self._finishing.submit(contextvars.copy_context().run, self.finish, rendered)
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
                self._delete(*attempt_keys(claim.job_id, claim.attempt), retry=False)
        except Exception:
            # Nobody reads this thread's result: log, and let the reaper requeue the job
            # once the heartbeat below has stopped.
            log.exception("job %s: could not record attempt %d", claim.job_id, claim.attempt)
            outcome = "unrecorded"
        finally:
            liveness.stop()
        text = describe(outcome)
        log.info("job %s attempt %d: %s", claim.job_id, claim.attempt, text)
        return text

    def _store_and_record(self, rendered: Rendered) -> Outcome:
        claim, liveness, timings = rendered.claim, rendered.liveness, rendered.timings
        if liveness.should_stop:
            return self._stop(claim, liveness)
        keys = attempt_keys(claim.job_id, claim.attempt)
        key, side_key = (
            video_key(claim.job_id, claim.attempt),
            sidecar_key(claim.job_id, claim.attempt),
        )
        # The encoded files stay in this folder (local disk) until they are stored or given up.
        with tempfile.TemporaryDirectory(prefix="fvb-encode-") as tmp:
            path = Path(tmp) / "video.mp4"
            started = time.perf_counter()
            write_mp4(rendered.frames, path, fps=rendered.fps)
            timings["mp4_encode"] = time.perf_counter() - started
            started = time.perf_counter()
            digest = sha256_file(path)
            size = path.stat().st_size
            timings["sha256"] = time.perf_counter() - started
            started = time.perf_counter()
            previews = make_previews(rendered.frames, Path(tmp), claim.job_id, claim.attempt)
            timings["previews"] = time.perf_counter() - started
            timings["encode"] = timings["mp4_encode"] + timings["previews"]
            outage = Outage(self.settings.storage_outage_max_s)

            def upload(what: str, fn: Callable[[], T]) -> T:
                return retry_until(
                    self.settings,
                    f"job {claim.job_id} upload of {what}",
                    fn,
                    errors=(StorageUnavailable,),
                    should_stop=lambda: liveness.should_stop,
                    outage=outage,
                )

            try:
                log.info("job %s attempt %d: uploading %s", claim.job_id, claim.attempt, key)
                started = time.perf_counter()
                upload(key, lambda: self.store.upload_video(path, key, digest))
                stored = [
                    upload(p.key, lambda p=p: self.store.put_file(p.path, p.key, p.content_type))
                    for p in previews
                ]
                timings["upload"] = time.perf_counter() - started
                timings["total"] = time.monotonic() - rendered.claimed_at
                sidecar = self._sidecar(rendered, key, size, digest, previews, stored)
                upload(side_key, lambda: self.store.put_json(side_key, sidecar))
            except StorageUnavailable as err:
                message = (
                    f"{err} (the store stayed unreachable for {outage.seconds:.0f}s; "
                    f"storage_outage_max_s is {self.settings.storage_outage_max_s:.0f})"
                )
                outcome = self._retry_later(claim, "storage_unavailable", message)
                # Record first: the store is down, so this one try is likely to fail too.
                self._delete(*keys, retry=False)
                return outcome
            except AttemptStopped:
                self._delete(*keys)
                return self._stop(claim, liveness)
        if not rendered.earlier_removed:
            self._remove_earlier_attempts(claim)
        # A cancel that came in during the upload wins over the upload.
        liveness.check()
        if liveness.should_stop:
            self._delete(*keys)
            return self._stop(claim, liveness)

        stage_timings = {k: round(v, 4) for k, v in timings.items()}
        result = self._result(rendered).to_json()
        won = self._record(
            claim,
            "success",
            lambda session: transitions.succeed(
                session,
                claim.job_id,
                claim.attempt,
                output_key=key,
                output_bytes=size,
                output_sha256=digest,
                stage_timings=stage_timings,
                result=result,
            ),
        )
        if won:
            return "succeeded"
        status = self._status(claim)
        if status == transitions.SUCCEEDED:
            # An earlier try committed; only its reply was lost. The objects are the output.
            log.info("job %s attempt %d: success was recorded", claim.job_id, claim.attempt)
            return "succeeded"
        # Either a cancel arrived after the last step (the row is still ours: finish the
        # cancel) or a newer attempt owns the job. Both ways the objects must go.
        self._delete(*keys)
        cancelled = status == transitions.CANCELLED or (
            status == transitions.RUNNING and self._record_cancel(claim)
        )
        log.warning(
            "job %s attempt %d: %s before recording success; deleted its objects",
            claim.job_id,
            claim.attempt,
            "cancelled" if cancelled else "superseded",
        )
        return "cancelled" if cancelled else "superseded"

    def _result(self, rendered: Rendered) -> JobResult:
        """What only the worker knows of the stored video (``Job.result``)."""
        if self._gpu_name is None:
            self._gpu_name = gpu_name(self.settings.worker_device)
        frames = rendered.frames
        return JobResult(
            frames=int(frames.shape[0]),
            fps=rendered.fps,
            width=int(frames.shape[2]),
            height=int(frames.shape[1]),
            model_revision=rendered.model_revision,
            gpu_name=self._gpu_name,
        )

    def _sidecar(
        self,
        rendered: Rendered,
        key: str,
        size: int,
        digest: str,
        previews: list[Preview],
        stored: list[StoredObject],
    ) -> dict[str, Any]:
        claim = rendered.claim
        frames = rendered.frames
        images = {
            name: {
                "key": obj.key,
                "bytes": obj.size,
                "sha256": obj.sha256,
                "content_type": preview.content_type,
                **preview.info,
            }
            for name, preview, obj in zip(
                ("thumbnail", "spritesheet"), previews, stored, strict=True
            )
        }
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
            **images,
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

    def _record(self, claim: transitions.Claim, what: str, transition: Callable[[Session], T]) -> T:
        """Run one guarded transition in its own transaction until the database answers
        (capped back-off, no try limit): the attempt's result is kept until it is recorded,
        or until the guard says the attempt no longer owns the job."""

        def once() -> T:
            with session_scope(self.settings.database_url) as session:
                return transition(session)

        return retry_until(
            self.settings, f"job {claim.job_id} recording {what}", once, errors=DB_ERRORS
        )

    def _status(self, claim: transitions.Claim) -> str | None:
        return self._record(
            claim,
            "outcome check",
            lambda session: transitions.attempt_status(session, claim.job_id, claim.attempt),
        )

    def _fail(self, claim: transitions.Claim, code: str, message: str) -> Outcome:
        log.warning("job %s attempt %d failed (%s): %s", claim.job_id, claim.attempt, code, message)
        won = self._record(
            claim,
            "failure",
            lambda session: transitions.fail(session, claim.job_id, claim.attempt, code, message),
        )
        if won or self._status(claim) == transitions.FAILED:
            return RenderFailed(code, message)
        return "lost"

    def _retry_later(self, claim: transitions.Claim, code: str, message: str) -> Outcome:
        """Back to the queue after a transient error (failed when no attempt is left)."""
        log.warning(
            "job %s attempt %d: %s, back to the queue: %s",
            claim.job_id,
            claim.attempt,
            code,
            message,
        )
        won = self._record(
            claim,
            "retry",
            lambda session: transitions.retry_later(
                session, claim.job_id, claim.attempt, code, message
            ),
        )
        status = self._status(claim)
        if status == transitions.FAILED:
            return RenderFailed(code, f"{message} (no attempts left)")
        if not won and status != transitions.QUEUED:
            return "lost"
        # A cancel asked for after the attempt last looked: the queued job is cancelled now.
        if self._record(
            claim,
            "cancel",
            lambda session: transitions.cancel_if_requested(session, claim.job_id),
        ):
            log.info("job %s attempt %d: cancelled while requeued", claim.job_id, claim.attempt)
            return "cancelled"
        return "requeued"

    def _record_cancel(self, claim: transitions.Claim) -> bool:
        if self._record(
            claim,
            "cancel",
            lambda session: transitions.finish_cancelled(session, claim.job_id, claim.attempt),
        ):
            return True
        return self._status(claim) == transitions.CANCELLED

    def _stop(self, claim: transitions.Claim, liveness: AttemptLiveness) -> Outcome:
        if liveness.lost:
            log.warning("job %s attempt %d: lost the job, stopping", claim.job_id, claim.attempt)
            return "lost"
        if not self._record_cancel(claim):
            return "lost"
        log.info(
            "job %s attempt %d: cancelled after step %d",
            claim.job_id,
            claim.attempt,
            liveness.last_step,
        )
        return "cancelled"

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
