"""``/v1/videos``: the OpenAI Videos API (create, retrieve, list, content, delete) + cancel."""

from __future__ import annotations

from typing import Annotated, Any

from botocore.exceptions import ClientError
from fastapi import APIRouter, Depends, Header, Response
from fastapi.responses import RedirectResponse, StreamingResponse

from scheduler.api import jobs
from scheduler.api.auth import Tenant
from scheduler.api.context import ApiContext, get_context
from scheduler.api.errors import ApiError
from scheduler.api.pagination import check_limit
from scheduler.api.schemas import JOB_STATUSES, VideoDeleted, VideoList, VideoObject
from scheduler.api.validation import read_create_body, validate_create
from scheduler.db.models import Job, JobStatus
from scheduler.storage import StorageUnavailable

router = APIRouter(prefix="/v1", tags=["videos"])

Context = Annotated[ApiContext, Depends(get_context)]

#: Tells the SDK's ``poll()`` how long to wait between retrievals (its default is 1 s).
POLL_AFTER_MS = "200"


def _video(context: ApiContext, job: Job, response: Response) -> VideoObject:
    response.headers["openai-poll-after-ms"] = POLL_AFTER_MS
    return VideoObject.from_job(job, context.store.bucket)


@router.post("/videos", response_model=VideoObject)
def create_video(
    tenant: Tenant,
    context: Context,
    fields: Annotated[dict[str, Any], Depends(read_create_body)],
    response: Response,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> VideoObject:
    request = validate_create(fields, context.models)
    submitted = jobs.submit(context, tenant, request, idempotency_key)
    if not submitted.created:
        response.headers["Idempotent-Replayed"] = "true"
    return _video(context, submitted.job, response)


@router.get("/videos", response_model=VideoList)
def list_videos(
    tenant: Tenant,
    context: Context,
    after: str | None = None,
    limit: int = 20,
    order: str = "desc",
    status: str | None = None,
    batch_id: str | None = None,
) -> VideoList:
    check_limit(limit)
    if order not in ("asc", "desc"):
        raise ApiError.invalid("order", f"order must be 'asc' or 'desc', got {order!r}")
    statuses = None
    if status:
        names = [name.strip() for name in status.split(",") if name.strip()]
        unknown = [name for name in names if name not in JOB_STATUSES]
        if unknown:
            raise ApiError.invalid(
                "status", f"unknown status {unknown[0]!r}; use one of {sorted(JOB_STATUSES)}"
            )
        statuses = tuple(s for name in names for s in JOB_STATUSES[name])
    page = jobs.list_page(
        context,
        tenant,
        after=after,
        limit=limit,
        descending=order == "desc",
        statuses=statuses,
        batch_id=batch_id,
    )
    data = [VideoObject.from_job(job, context.store.bucket) for job in page.jobs]
    return VideoList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=page.has_more,
    )


@router.get("/videos/{video_id}", response_model=VideoObject)
def retrieve_video(
    video_id: str, tenant: Tenant, context: Context, response: Response
) -> VideoObject:
    return _video(context, jobs.get(context, tenant, video_id), response)


@router.get("/videos/{video_id}/content", response_model=None)
def download_video(
    video_id: str,
    tenant: Tenant,
    context: Context,
    variant: str = "video",
    redirect: bool = False,
) -> Response:
    if variant != "video":
        raise ApiError.invalid("variant", f"variant {variant!r} is not available; only 'video'")
    job = jobs.get(context, tenant, video_id)
    if job.status != JobStatus.SUCCEEDED or not job.output_key:
        state = VideoObject.from_job(job, context.store.bucket).status
        raise ApiError(
            409,
            f"Video '{video_id}' is {state}; its content is available once it is completed",
            param="video_id",
            code="video_not_ready" if state in ("queued", "in_progress") else "video_failed",
        )
    if redirect:
        return RedirectResponse(context.store.presigned_get_url(job.output_key), 307)
    chunks = context.store.stream(job.output_key)
    # Read the first chunk here, so a missing object or a store that is down is an error
    # answer rather than a response cut off after its headers.
    try:
        first = next(chunks, b"")
    except StorageUnavailable as err:
        cause = err.__cause__
        if isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") in (
            "NoSuchKey",
            "404",
        ):
            raise ApiError.not_found(
                f"The content of video '{video_id}' is no longer stored"
            ) from err
        raise ApiError(
            503, "storage is unavailable; retry later", code="storage_unavailable"
        ) from err

    def body():
        yield first
        yield from chunks

    headers = {"Content-Disposition": f'attachment; filename="{video_id}.mp4"'}
    if job.output_bytes is not None:
        headers["Content-Length"] = str(job.output_bytes)
    return StreamingResponse(body(), media_type="video/mp4", headers=headers)


@router.delete("/videos/{video_id}", response_model=VideoDeleted)
def delete_video(video_id: str, tenant: Tenant, context: Context) -> VideoDeleted:
    jobs.delete(context, tenant, video_id)
    return VideoDeleted(id=video_id)


@router.post("/videos/{video_id}/cancel", response_model=VideoObject)
def cancel_video(
    video_id: str, tenant: Tenant, context: Context, response: Response
) -> VideoObject:
    return _video(context, jobs.cancel(context, tenant, video_id), response)
