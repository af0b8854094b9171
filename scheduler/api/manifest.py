"""A batch's manifest: one row per video, everything a training data loader or an audit
needs (``GET /v1/batches/{id}/manifest``, ``fvb bulk export``).

Rows are read in pages along the batch's ``(batch_id, id)`` index and written as they come:
the cost per row is flat and the answer is never held whole, whatever the batch's size.
The columns are listed once, in :data:`fvb_core.manifest.COLUMNS`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fvb_core.db.models import Job
from fvb_core.db.session import session_scope
from fvb_core.jobs import JobParams, JobResult, JobStatus
from fvb_core.manifest import LINE_KEY
from fvb_core.storage import VideoStore
from scheduler.api.schemas import API_STATUS, unix

#: Rows read per query.
PAGE = 1000


def _timing(timings: dict[str, Any], *names: str) -> float | None:
    for name in names:
        value = timings.get(name)
        if isinstance(value, int | float):
            return round(float(value), 4)
    return None


def _line(metadata: dict[str, str]) -> int | None:
    value = metadata.get(LINE_KEY)
    return int(value) if value is not None and value.isdigit() else None


def _status(job: Job) -> str:
    """The API's status name, except that the manifest tells cancelled and expired videos
    apart from failed and completed ones (the video object cannot: OpenAI's states)."""
    if job.expired_at is not None:
        return "expired"
    if job.status == JobStatus.CANCELLED:
        return "cancelled"
    return API_STATUS[job.status]


def row(job: Job, store: VideoStore) -> dict[str, Any]:
    """The manifest row of one video."""
    params = JobParams.from_json(job.params)
    result = JobResult.from_json(job.result)
    timings = job.stage_timings or {}
    stored = job.status == JobStatus.SUCCEEDED and job.output_key and job.expired_at is None
    failed = job.status in (JobStatus.FAILED, JobStatus.CANCELLED)
    generation = {
        k: v for k, v in params.to_json().items() if k not in ("metadata", "input_image_key")
    }
    started = job.started_at
    return {
        "item_key": job.idempotency_key,
        "line": _line(params.metadata),
        "video_id": job.id,
        "batch_id": job.batch_id,
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt,
        "seed": params.seed,
        "num_inference_steps": params.num_inference_steps,
        "guidance_scale": params.guidance_scale,
        "params": json.dumps(generation, sort_keys=True),
        "model": job.model,
        "model_revision": result.model_revision,
        "status": _status(job),
        "error_code": job.error_code if failed else None,
        "error_message": job.error_message if failed else None,
        "attempts": job.attempt,
        "storage_uri": store.uri(job.output_key) if stored else None,
        "url": store.presigned_get_url(job.output_key) if stored else None,
        "sha256": job.output_sha256 if stored else None,
        "bytes": job.output_bytes if stored else None,
        "frames": result.frames or params.num_frames,
        "fps": result.fps or params.fps,
        "width": result.width or params.width,
        "height": result.height or params.height,
        "seconds": params.shown_seconds or None,
        "created_at": unix(job.created_at),
        "finished_at": unix(job.finished_at),
        "expires_at": unix(job.expires_at),
        "queue_wait_s": round((started - job.created_at).total_seconds(), 4) if started else None,
        "render_s": _timing(timings, "render", "generate"),
        "encode_s": _timing(timings, "mp4_encode", "encode"),
        "upload_s": _timing(timings, "upload"),
        "worker_id": job.worker_id,
        "gpu_name": result.gpu_name,
    }


def rows(database_url: str, batch_id: str, store: VideoStore) -> Iterator[dict[str, Any]]:
    """Every row of the batch, a page per short transaction (nothing held between pages)."""
    after = ""
    while True:
        with session_scope(database_url) as session:
            page = _page(session, batch_id, after)
        yield from (row(job, store) for job in page)
        if len(page) < PAGE:
            return
        after = page[-1].id


def _page(session: Session, batch_id: str, after: str) -> list[Job]:
    query = (
        select(Job)
        .where(Job.batch_id == batch_id, Job.id > after, Job.deleted_at.is_(None))
        .order_by(Job.id)
        .limit(PAGE)
    )
    jobs = list(session.execute(query).scalars())
    session.expunge_all()
    return jobs


def jsonl(database_url: str, batch_id: str, store: VideoStore) -> Iterator[bytes]:
    """The manifest as JSON lines, in chunks of a page."""
    lines: list[str] = []
    for item in rows(database_url, batch_id, store):
        lines.append(json.dumps(item, ensure_ascii=False))
        if len(lines) >= PAGE:
            yield ("\n".join(lines) + "\n").encode()
            lines = []
    if lines:
        yield ("\n".join(lines) + "\n").encode()
