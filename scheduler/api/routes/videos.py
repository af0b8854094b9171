"""``/v1/videos``: the OpenAI Videos API (create, retrieve, list, content, delete) + cancel.

The OpenAI operations this service does not offer (remix, edits, extensions, characters)
answer 400 ``unsupported_operation`` in the OpenAI error shape, so an SDK call gets a clear
``BadRequestError`` rather than a bare 404. They are left out of the OpenAPI schema: they
are not part of this API, only a clear answer for clients that try them.

Empty query parameters (``?after=&batch_id=``) mean "not given", as most clients send them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Response
from fastapi.responses import RedirectResponse, StreamingResponse
from starlette.background import BackgroundTask

from fvb_core.db.models import Job
from fvb_core.jobs import JobStatus
from fvb_core.storage import ObjectMissing, StorageUnavailable, spritesheet_key, thumbnail_key
from scheduler.api import jobs
from scheduler.api.auth import CurrentPrincipal, Tenant
from scheduler.api.context import ApiContext, get_context
from scheduler.api.errors import ApiError
from scheduler.api.openapi import CREATE_VIDEO_BODY, errors
from scheduler.api.pagination import LIMIT_RANGE, check_limit
from scheduler.api.release_once import ReleaseOnce
from scheduler.api.schemas import (
    JOB_STATUSES,
    VideoDeleted,
    VideoList,
    VideoObject,
    is_expired,
)
from scheduler.api.session import SessionDep
from scheduler.api.validation import read_create_body, validate_create

router = APIRouter(prefix="/v1", tags=["videos"], responses=errors(401, 403, 429, 500, 503))

Context = Annotated[ApiContext, Depends(get_context)]

#: ``status``: one API status or several, comma-separated.
STATUS_LIST = {"pattern": rf"^(|({'|'.join(JOB_STATUSES)})(,({'|'.join(JOB_STATUSES)}))*)$"}

#: Tells the SDK's ``poll()`` how long to wait between retrievals (its default is 1 s).
POLL_AFTER_MS = "200"

#: variant -> (its key for a job, media type, file extension).
VARIANTS: dict[str, tuple[Callable[[Job], str], str, str]] = {
    "video": (lambda job: job.output_key or "", "video/mp4", "mp4"),
    "thumbnail": (lambda job: thumbnail_key(job.id, job.attempt), "image/webp", "webp"),
    "spritesheet": (lambda job: spritesheet_key(job.id, job.attempt), "image/jpeg", "jpg"),
}


def _video(context: ApiContext, job: Job, response: Response) -> VideoObject:
    response.headers["openai-poll-after-ms"] = POLL_AFTER_MS
    return VideoObject.from_job(job, context.store.bucket)


@router.post(
    "/videos",
    response_model=VideoObject,
    openapi_extra=CREATE_VIDEO_BODY,
    responses=errors(400, 404, 409, 413, 415),
)
def create_video(
    principal: CurrentPrincipal,
    session: SessionDep,
    context: Context,
    fields: Annotated[dict[str, Any], Depends(read_create_body)],
    response: Response,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> VideoObject:
    request = validate_create(fields, context.models)
    submitted = jobs.submit(session, context, principal, request, idempotency_key)
    if not submitted.created:
        response.headers["Idempotent-Replayed"] = "true"
    return _video(context, submitted.job, response)


@router.get("/videos", response_model=VideoList, responses=errors(400))
def list_videos(
    tenant: Tenant,
    session: SessionDep,
    context: Context,
    after: str | None = None,
    limit: Annotated[int, Query(json_schema_extra=LIMIT_RANGE)] = 20,
    order: Literal["asc", "desc"] = "desc",
    status: Annotated[str | None, Query(json_schema_extra=STATUS_LIST)] = None,
    batch_id: str | None = None,
) -> VideoList:
    check_limit(limit)
    after, batch_id = after or None, batch_id or None
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
        session,
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


@router.get("/videos/{video_id}", response_model=VideoObject, responses=errors(404))
def retrieve_video(
    video_id: str, tenant: Tenant, session: SessionDep, context: Context, response: Response
) -> VideoObject:
    return _video(context, jobs.get(session, tenant, video_id), response)


def _expired(job: Job) -> ApiError:
    """410 for the content of a video past its retention, saying when and why."""
    moment = job.expires_at or job.expired_at
    when = moment.strftime("%Y-%m-%dT%H:%M:%SZ") if moment else "an earlier time"
    kept = f", {job.retention_s} s after it completed (its retention)" if job.retention_s else ""
    gone = "was deleted" if job.expired_at is not None else "is no longer available"
    return ApiError(
        410,
        f"Video '{job.id}' expired at {when}{kept}; its content {gone}",
        param="video_id",
        code="video_expired",
    )


@router.get(
    "/videos/{video_id}/content",
    response_class=Response,
    responses={
        200: {
            "description": "The video (mp4) or one of its previews",
            "content": {"video/mp4": {}, "image/webp": {}, "image/jpeg": {}},
        },
        307: {"description": "Redirect to a presigned URL (with redirect=true)"},
        **errors(400, 404, 409, 410),
    },
)
def download_video(
    video_id: str,
    tenant: Tenant,
    session: SessionDep,
    context: Context,
    variant: Literal["video", "thumbnail", "spritesheet"] = "video",
    redirect: bool = False,
) -> Response:
    job = jobs.get(session, tenant, video_id)
    if job.status != JobStatus.SUCCEEDED or not job.output_key:
        state = VideoObject.from_job(job, context.store.bucket).status
        raise ApiError(
            409,
            f"Video '{video_id}' is {state}; its content is available once it is completed",
            param="video_id",
            code="video_not_ready" if state in ("queued", "in_progress") else "video_failed",
        )
    if is_expired(job):  # every variant, streamed or presigned
        raise _expired(job)
    key_of, media_type, extension = VARIANTS[variant]
    key = key_of(job)
    if redirect:
        return RedirectResponse(context.store.presigned_get_url(key), 307)
    release = ReleaseOnce(context.take_download_slot())
    try:
        size, chunks = context.store.open(key)
    except ObjectMissing as err:
        release()
        if variant == "video":
            raise ApiError.not_found(
                f"The content of video '{video_id}' is no longer stored"
            ) from err
        raise ApiError.not_found(
            f"The {variant} of video '{video_id}' is not stored (a video rendered before "
            "previews existed has none)",
            "variant",
        ) from err
    except StorageUnavailable as err:
        release()
        raise ApiError(
            503,
            "storage is unavailable; retry later",
            code="storage_unavailable",
            headers={"Retry-After": "5"},
        ) from err

    def body() -> Iterator[bytes]:
        try:
            yield from chunks
        finally:
            release()

    headers = {"Content-Disposition": f'attachment; filename="{video_id}.{extension}"'}
    if size is not None:
        headers["Content-Length"] = str(size)
    return StreamingResponse(
        body(), media_type=media_type, headers=headers, background=BackgroundTask(release)
    )


@router.delete("/videos/{video_id}", response_model=VideoDeleted, responses=errors(404))
def delete_video(
    video_id: str, tenant: Tenant, session: SessionDep, context: Context
) -> VideoDeleted:
    jobs.delete(session, context, tenant, video_id)
    return VideoDeleted(id=video_id)


@router.post("/videos/{video_id}/cancel", response_model=VideoObject, responses=errors(404))
def cancel_video(
    video_id: str, tenant: Tenant, session: SessionDep, context: Context, response: Response
) -> VideoObject:
    return _video(context, jobs.cancel(session, tenant, video_id), response)


def _unsupported(operation: str) -> ApiError:
    return ApiError(
        400,
        f"{operation} is not supported by this service: it renders new videos from a prompt "
        "(and an image), POST /v1/videos",
        code="unsupported_operation",
    )


@router.post("/videos/{video_id}/remix", include_in_schema=False)
def remix_video(video_id: str, _tenant: Tenant) -> None:
    raise _unsupported("Remixing a video")


@router.post("/videos/edits", include_in_schema=False)
def edit_video(_tenant: Tenant) -> None:
    raise _unsupported("Editing a video")


@router.post("/videos/extensions", include_in_schema=False)
def extend_video(_tenant: Tenant) -> None:
    raise _unsupported("Extending a video")


@router.post("/videos/characters", include_in_schema=False)
def create_character(_tenant: Tenant) -> None:
    raise _unsupported("Creating a character")


@router.get("/videos/characters/{character_id}", include_in_schema=False)
def get_character(character_id: str, _tenant: Tenant) -> None:
    raise _unsupported("Reading a character")
