"""The API's response objects (OpenAI Videos shapes plus our extensions).

Kept apart from the database models: a :class:`~fvb_core.db.models.Job` becomes a
:class:`VideoObject` in :meth:`VideoObject.from_job`, the one place that maps job states to
API states (contract: ``queued | in_progress | completed | failed``, cancelled shows as
failed with ``error.code = "cancelled"``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from fvb_core.db.models import Batch, Job, utcnow
from fvb_core.jobs import BatchStatus, JobParams, JobStatus
from fvb_core.manifest import LINE_KEY
from fvb_core.models_config import ServedModel

ApiStatus = Literal["queued", "in_progress", "completed", "failed"]

API_STATUS: dict[str, ApiStatus] = {
    JobStatus.QUEUED: "queued",
    JobStatus.RUNNING: "in_progress",
    JobStatus.SUCCEEDED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "failed",
}

#: API status -> the job states it covers (for the list filter).
JOB_STATUSES: dict[str, tuple[str, ...]] = {
    "queued": (JobStatus.QUEUED,),
    "in_progress": (JobStatus.RUNNING,),
    "completed": (JobStatus.SUCCEEDED,),
    "failed": (JobStatus.FAILED, JobStatus.CANCELLED),
}


def unix(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def is_expired(job: Job, now: datetime | None = None) -> bool:
    """Past its retention: the sweeper deleted its objects, or is about to (from
    ``expires_at`` on, its content is not served even if the sweep has not run yet)."""
    if job.expired_at is not None:
        return True
    return job.expires_at is not None and job.expires_at <= (now or utcnow())


class VideoError(BaseModel):
    code: str
    message: str


class VideoOutput(BaseModel):
    uri: str
    bytes: int | None
    sha256: str | None


class VideoObject(BaseModel):
    id: str
    object: Literal["video"] = "video"
    model: str
    status: ApiStatus
    progress: int
    created_at: int
    completed_at: int | None
    expires_at: int | None
    prompt: str | None
    size: str
    seconds: str
    error: VideoError | None
    remixed_from_video_id: str | None = None
    # Extensions.
    num_frames: int | None = None
    fps: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    #: Two-expert models (Wan2.2 A14B): the low-noise expert's scale, when given.
    guidance_scale_2: float | None = None
    seed: int | None = None
    priority: int = 0
    metadata: dict[str, str] | None = None
    batch_id: str | None = None
    cancel_requested: bool = False
    output: VideoOutput | None = None
    #: True once the video's retention is over (``expires_at`` passed): its content is gone
    #: (``GET .../content`` answers 410). ``status`` stays "completed", as the SDK expects.
    expired: bool = False
    #: When the sweeper deleted its objects (None while stored, or not swept yet).
    expired_at: int | None = None

    @classmethod
    def from_job(cls, job: Job, bucket: str) -> VideoObject:
        params = JobParams.from_json(job.params)
        final = JobStatus(job.status).is_final
        error = None
        # A queued job may carry the error of a failed earlier attempt; only a final
        # failure is the video's error.
        if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
            default_code = "cancelled" if job.status == JobStatus.CANCELLED else "failed"
            error = VideoError(
                code=job.error_code or default_code,
                message=job.error_message or default_code,
            )
        output = None
        if job.status == JobStatus.SUCCEEDED and job.output_key:
            output = VideoOutput(
                uri=f"s3://{bucket}/{job.output_key}",
                bytes=job.output_bytes,
                sha256=job.output_sha256,
            )
        return cls(
            id=job.id,
            model=job.model,
            status=API_STATUS[job.status],
            progress=max(0, min(100, int(job.progress or 0))),
            created_at=unix(job.created_at) or 0,
            completed_at=unix(job.finished_at) if final else None,
            expires_at=unix(job.expires_at) if job.status == JobStatus.SUCCEEDED else None,
            prompt=params.prompt,
            size=params.size,
            seconds=params.shown_seconds,
            error=error,
            num_frames=params.num_frames,
            fps=params.fps,
            num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale,
            guidance_scale_2=params.guidance_scale_2,
            seed=params.seed,
            priority=job.priority,
            metadata=params.metadata or None,
            batch_id=job.batch_id,
            cancel_requested=bool(job.cancel_requested),
            output=output,
            expired=job.status == JobStatus.SUCCEEDED and is_expired(job),
            expired_at=unix(job.expired_at),
        )


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fastvideo-batch"
    # Extensions.
    pipeline: str
    pool: str
    queue: str
    gpus: int
    image_to_video: bool
    #: Wan2.2's two experts: the video body takes guidance_scale_2.
    two_experts: bool = False
    #: A few-step distilled model's fixed steps (no guidance, no negative prompt), or None.
    distilled_steps: int | None = None
    default_size: str
    default_fps: int
    max_frames: int
    max_steps: int
    max_pixels: int
    #: The largest width or height the model's rotary table reaches.
    max_side: int
    spatial_multiple: int
    temporal_factor: int

    @classmethod
    def from_served(cls, model: ServedModel, created: int) -> ModelObject:
        return cls(
            id=model.name,
            created=created,
            pipeline=model.pipeline_class,
            pool=model.pool,
            queue=model.queue,
            gpus=model.gpus,
            image_to_video=model.image_to_video,
            two_experts=model.two_experts,
            distilled_steps=model.distilled_steps,
            default_size=model.default_size,
            default_fps=model.default_fps,
            max_frames=model.longest,
            max_steps=model.max_steps,
            max_pixels=model.max_pixels,
            max_side=model.max_side,
            spatial_multiple=model.spatial_multiple,
            temporal_factor=model.temporal_factor,
        )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class Health(BaseModel):
    status: str
    checks: dict[str, Any] | None = None


class BatchCounts(BaseModel):
    total: int
    queued: int
    in_progress: int
    completed: int
    failed: int
    cancelled: int


class BatchProgress(BaseModel):
    window_seconds: int
    finished_in_window: int
    videos_per_second: float
    eta_seconds: int | None


class BatchObject(BaseModel):
    """A batch: ``in_progress`` while any video is unfinished (or none was added yet),
    ``completed`` once every video finished, ``cancelling`` / ``cancelled`` after a cancel."""

    id: str
    object: Literal["batch"] = "batch"
    status: Literal["in_progress", "completed", "cancelling", "cancelled"]
    created_at: int
    metadata: dict[str, str] | None = None
    request_counts: BatchCounts
    #: The tenant's name for the batch (``fvb bulk submit --name``), unique per tenant.
    name: str | None = None
    #: Seconds its videos' objects are kept after they finish (None: the deployment's).
    retention_seconds: int | None = None
    #: Throughput lately and the ETA (``GET /v1/batches/{id}`` only).
    progress: BatchProgress | None = None

    @classmethod
    def from_batch(
        cls, batch: Batch, counts: dict[str, int], progress: dict[str, Any] | None = None
    ) -> BatchObject:
        unfinished = counts["queued"] + counts["in_progress"]
        if batch.status == BatchStatus.CANCELLED:
            status = "cancelling" if unfinished else "cancelled"
        else:
            status = "in_progress" if unfinished or not counts["total"] else "completed"
        return cls(
            id=batch.id,
            status=status,
            created_at=unix(batch.created_at) or 0,
            metadata=(batch.params or {}).get("metadata"),
            request_counts=BatchCounts(**counts),
            name=batch.name,
            retention_seconds=batch.retention_s,
            progress=BatchProgress(**progress) if progress else None,
        )


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class BatchItem(BaseModel):
    index: int
    id: str
    #: False when the item's ``item_key`` had made this video before (a resumed run).
    created: bool


class BatchItemError(BaseModel):
    index: int
    error: dict[str, Any]


class BatchVideosAdded(BaseModel):
    """The answer of ``POST /v1/batches/{id}/videos``."""

    object: Literal["batch.videos"] = "batch.videos"
    batch_id: str
    data: list[BatchItem]
    errors: list[BatchItemError]


class BatchUploadLineError(BaseModel):
    line: int
    error: dict[str, Any]


class BatchUpload(BaseModel):
    """What a JSONL upload to ``POST /v1/batches`` (or ``/v1/batches/{id}/videos``) did."""

    lines: int
    created: int
    existing: int
    #: How many lines were refused; the first ``MAX_REPORTED_ERRORS`` are in ``errors``.
    error_count: int
    errors: list[BatchUploadLineError]


class BatchUploaded(BatchObject):
    upload: BatchUpload


class BatchItemRow(BaseModel):
    """One video of a batch with its item key (``GET /v1/batches/{id}/items``)."""

    id: str
    object: Literal["batch.item"] = "batch.item"
    item_key: str | None
    status: ApiStatus
    line: int | None
    seed: int | None
    error: VideoError | None

    @classmethod
    def from_job(cls, job: Job) -> BatchItemRow:
        params = JobParams.from_json(job.params)
        line = params.metadata.get(LINE_KEY, "")
        error = None
        if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
            error = VideoError(
                code=job.error_code or "failed", message=job.error_message or "failed"
            )
        return cls(
            id=job.id,
            item_key=job.idempotency_key,
            status=API_STATUS[job.status],
            line=int(line) if line.isdigit() else None,
            seed=params.seed,
            error=error,
        )


class BatchItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchItemRow]
    first_id: str | None
    last_id: str | None
    has_more: bool


class BatchRetried(BatchObject):
    """``POST /v1/batches/{id}/retry_failed``: the batch, and the videos queued again."""

    retried: list[str]
