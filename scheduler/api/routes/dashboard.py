"""``/dashboard``: the operator console (a static page, its script and style) and the JSON
routes it calls.

The page holds no data and needs no key: it reads the key from its URL fragment
(``/dashboard#key=fvb-...``, never sent to the server) and sends it as a Bearer header. A
tenant's key sees its own jobs; an operator's key (``fvb keys create --operator``) sees
every tenant's, and its actions on them (cancel, retry, delete) go through these routes with
no tenant (``/v1/videos`` stays tenant-scoped). ``<video src>`` and the manifest download
cannot send a header: they use short-lived signed links (``scheduler/api/dashboard_links``).

The page, script and style are read once, at import, so a missing file is an error at
start-up; they ship as package data (``scheduler/api/static/``). The page's
Content-Security-Policy allows scripts, styles, requests and media from this origin only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel
from sqlalchemy import select

from fvb_core.db.models import Batch, utcnow
from scheduler.api import (
    batches,
    dashboard_data,
    dashboard_jobs,
    dashboard_links,
    fleet_view,
    manifest,
)
from scheduler.api.auth import CurrentPrincipal, Principal
from scheduler.api.context import ApiContext, get_context
from scheduler.api.dashboard_data import DashboardData
from scheduler.api.dashboard_jobs import JobDetail, JobPage, scope_of
from scheduler.api.errors import ApiError
from scheduler.api.fleet_view import FleetWorker
from scheduler.api.openapi import errors
from scheduler.api.schemas import BatchObject, BatchRetried
from scheduler.api.session import SessionDep

router = APIRouter(tags=["dashboard"], responses=errors(401, 403, 429, 500, 503))

Context = Annotated[ApiContext, Depends(get_context)]

STATIC = Path(__file__).resolve().parent.parent / "static"


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise RuntimeError(
            f"the dashboard file {path} is missing: install the package with its data "
            "files (scheduler/api/static/*)"
        ) from err


PAGE = _read(STATIC / "dashboard.html")
#: name -> (text, media type), served under /dashboard/assets/.
ASSETS = {
    "dashboard.js": (_read(STATIC / "dashboard.js"), "text/javascript; charset=utf-8"),
    "dashboard.css": (_read(STATIC / "dashboard.css"), "text/css; charset=utf-8"),
}
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "media-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
NO_STORE = {"Cache-Control": "no-store"}


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
def dashboard_page() -> HTMLResponse:
    return HTMLResponse(PAGE, headers=PAGE_HEADERS)


@router.get("/dashboard/assets/{name}", include_in_schema=False)
def dashboard_asset(name: str) -> Response:
    if name not in ASSETS:
        raise ApiError.not_found(f"No dashboard file '{name}'")
    text, media_type = ASSETS[name]
    return Response(
        text,
        media_type=media_type,
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
    )


@router.get("/dashboard/data", response_model=DashboardData, responses=errors(400))
def dashboard_json(
    principal: CurrentPrincipal,
    session: SessionDep,
    context: Context,
    response: Response,
    status: Annotated[
        str | None, Query(json_schema_extra={"enum": ["", *sorted(dashboard_data.STATUS_FILTERS)]})
    ] = None,
) -> DashboardData:
    status_filter = dashboard_data.parse_status_filter(status)
    response.headers.update(NO_STORE)
    # An operator's key sees the whole service; a tenant's its own.
    return dashboard_data.collect(
        session, context, principal.tenant, status_filter, every_tenant=principal.operator
    )


class Me(BaseModel):
    tenant: str
    operator: bool


@router.get("/dashboard/me", response_model=Me)
def dashboard_me(principal: CurrentPrincipal) -> Me:
    """Who the key acts for: the page shows operators the tenant column and filter."""
    return Me(tenant=principal.tenant, operator=principal.operator)


class Fleet(BaseModel):
    generated_at: int
    #: Whose: the tenant (the workers running its jobs), or None for an operator (all).
    scope: str | None
    fleet: list[FleetWorker]


@router.get("/dashboard/fleet", response_model=Fleet)
def dashboard_fleet(
    principal: CurrentPrincipal, session: SessionDep, context: Context, response: Response
) -> Fleet:
    """The workers view: every live worker, idle ones too, for an operator; for a tenant,
    those running its jobs (``fleet`` of ``/dashboard/data``, scoped by the key's role)."""
    now = utcnow()
    scope = scope_of(principal)
    try:
        workers = fleet_view.fleet(session, context.settings, scope, now)
    finally:
        session.commit()
    response.headers.update(NO_STORE)
    return Fleet(generated_at=int(now.timestamp()), scope=scope, fleet=workers)


# --- jobs --------------------------------------------------------------------------------


@router.get("/dashboard/jobs", response_model=JobPage, responses=errors(400))
def dashboard_jobs_list(
    principal: CurrentPrincipal,
    session: SessionDep,
    response: Response,
    state: Annotated[
        str | None,
        Query(description="job states, comma-separated: " + ", ".join(dashboard_jobs.STATES)),
    ] = None,
    model: str | None = None,
    batch_id: str | None = None,
    tenant: Annotated[str | None, Query(description="operators: one tenant's jobs")] = None,
    created_after: Annotated[int | None, Query(description="unix seconds, inclusive")] = None,
    created_before: Annotated[int | None, Query(description="unix seconds, exclusive")] = None,
    q: Annotated[
        str | None,
        Query(
            description="prompt text (case-insensitive), searched among the newest "
            f"{dashboard_jobs.SCAN_LIMIT} jobs the other filters select per request"
        ),
    ] = None,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    limit: Annotated[int, Query(json_schema_extra={"minimum": 1, "maximum": 100})] = 50,
) -> JobPage:
    """Jobs newest first, filtered, a page at a time by cursor (keyset)."""
    filters = dashboard_jobs.parse_filters(
        principal,
        state=state,
        model=model,
        batch_id=batch_id,
        tenant=tenant,
        created_after=created_after,
        created_before=created_before,
        q=q,
    )
    response.headers.update(NO_STORE)
    return dashboard_jobs.list_page(session, scope_of(principal), filters, cursor or None, limit)


@router.get("/dashboard/jobs/{video_id}", response_model=JobDetail, responses=errors(404))
def dashboard_job(
    video_id: str, principal: CurrentPrincipal, session: SessionDep, context: Context,
    response: Response,
) -> JobDetail:  # fmt: skip
    """One job in full: prompt, parameters, events, stage timings, attempts, error."""
    response.headers.update(NO_STORE)
    return dashboard_jobs.detail(session, context, scope_of(principal), video_id)


@router.post(
    "/dashboard/jobs/{video_id}/cancel", response_model=JobDetail, responses=errors(404, 409)
)
def dashboard_job_cancel(
    video_id: str, principal: CurrentPrincipal, session: SessionDep, context: Context
) -> JobDetail:
    """Queued: cancelled now; running: stopped at its next step; finished: 409."""
    dashboard_jobs.cancel(session, scope_of(principal), video_id)
    return dashboard_jobs.detail(session, context, scope_of(principal), video_id)


@router.post(
    "/dashboard/jobs/{video_id}/retry", response_model=JobDetail, responses=errors(404, 409)
)
def dashboard_job_retry(
    video_id: str, principal: CurrentPrincipal, session: SessionDep, context: Context
) -> JobDetail:
    """A failed or cancelled video queued again as a new attempt (409 in any other state,
    429 when its tenant's queue is full)."""
    dashboard_jobs.retry(session, context, principal, video_id)
    return dashboard_jobs.detail(session, context, scope_of(principal), video_id)


class Deleted(BaseModel):
    id: str
    deleted: bool = True


@router.post("/dashboard/jobs/{video_id}/delete", response_model=Deleted, responses=errors(404))
def dashboard_job_delete(
    video_id: str, principal: CurrentPrincipal, session: SessionDep, context: Context
) -> Deleted:
    """``DELETE /v1/videos/{id}``: cancelled if unfinished, its files deleted, then hidden."""
    dashboard_jobs.delete(session, context, scope_of(principal), video_id)
    return Deleted(id=video_id)


class SignedLink(BaseModel):
    #: Path and query on this API, usable without a header until ``expires_at``.
    url: str
    expires_at: int


@router.post(
    "/dashboard/jobs/{video_id}/media", response_model=SignedLink, responses=errors(404, 409, 410)
)
def dashboard_job_media_link(
    video_id: str,
    principal: CurrentPrincipal,
    session: SessionDep,
    context: Context,
    request: Request,
) -> SignedLink:
    """A short-lived URL of the completed video, for ``<video src>``."""
    dashboard_jobs.video_of(session, scope_of(principal), video_id)
    url = request.url_for("dashboard_media", video_id=video_id)
    link = dashboard_links.sign(request, session, context, url, f"video:{video_id}")
    return SignedLink(url=link.url, expires_at=link.expires_at)


@router.get("/dashboard/media/{video_id}", include_in_schema=False, name="dashboard_media")
def dashboard_media(
    video_id: str,
    session: SessionDep,
    context: Context,
    request: Request,
    k: str | None = None,
    exp: int | None = None,
    sig: str | None = None,
    range_header: Annotated[str | None, Header(alias="range")] = None,
) -> StreamingResponse:
    """The video of a signed link, whole or by ``Range`` (206)."""
    principal = dashboard_links.verify(request, session, context, f"video:{video_id}", k, exp, sig)
    job = dashboard_jobs.video_of(session, scope_of(principal), video_id)
    return dashboard_links.stream(
        context, job.output_key or "", job.output_bytes, "video/mp4", range_header,
        f"{video_id}.mp4",
    )  # fmt: skip


# --- batches -----------------------------------------------------------------------------


def _batch(session: SessionDep, scope: str | None, batch_id: str) -> Batch:
    where = [Batch.id == batch_id] + ([Batch.tenant == scope] if scope is not None else [])
    batch = session.execute(select(Batch).where(*where)).scalar_one_or_none()
    session.commit()
    if batch is None:
        raise ApiError.not_found(f"No batch found with id '{batch_id}'", "batch_id")
    return batch


def _batch_owner(session: SessionDep, principal: Principal, batch_id: str) -> Principal:
    """Who acts on the batch: the key's own tenant, or, for an operator, the batch's tenant
    (admitted under the deployment's limit, as a retry of another tenant's video is)."""
    batch = _batch(session, scope_of(principal), batch_id)
    return principal if batch.tenant == principal.tenant else Principal(batch.tenant)


@router.get("/dashboard/batches/{batch_id}", response_model=BatchObject, responses=errors(404))
def dashboard_batch(batch_id: str, principal: CurrentPrincipal, session: SessionDep) -> BatchObject:
    """``GET /v1/batches/{id}``, and for an operator any tenant's batch."""
    owner = _batch_owner(session, principal, batch_id)
    batch = batches.get(session, owner.tenant, batch_id)
    counts = batches.counts(session, batch.id)
    return BatchObject.from_batch(batch, counts, batches.progress(session, batch.id, counts))


@router.post(
    "/dashboard/batches/{batch_id}/cancel", response_model=BatchObject, responses=errors(404)
)
def dashboard_batch_cancel(
    batch_id: str, principal: CurrentPrincipal, session: SessionDep
) -> BatchObject:
    owner = _batch_owner(session, principal, batch_id)
    batch = batches.cancel(session, owner.tenant, batch_id)
    return BatchObject.from_batch(batch, batches.counts(session, batch.id))


@router.post(
    "/dashboard/batches/{batch_id}/retry_failed",
    response_model=BatchRetried,
    responses=errors(400, 404, 409, 429),
)
def dashboard_batch_retry_failed(
    batch_id: str,
    principal: CurrentPrincipal,
    session: SessionDep,
    context: Context,
    code: Annotated[str | None, Query(description="only videos that failed with it")] = None,
) -> BatchRetried:
    """``POST /v1/batches/{id}/retry_failed``, and for an operator any tenant's batch."""
    owner = _batch_owner(session, principal, batch_id)
    retried = batches.retry_failed(session, context, owner, batch_id, code)
    batch = batches.get(session, owner.tenant, batch_id)
    counts = batches.counts(session, batch_id)
    return BatchRetried(**BatchObject.from_batch(batch, counts).model_dump(), retried=retried)


@router.post(
    "/dashboard/batches/{batch_id}/manifest", response_model=SignedLink, responses=errors(404)
)
def dashboard_manifest_link(
    batch_id: str,
    principal: CurrentPrincipal,
    session: SessionDep,
    context: Context,
    request: Request,
) -> SignedLink:
    """A short-lived URL of the batch's manifest (JSON lines), for a download link."""
    _batch(session, scope_of(principal), batch_id)
    url = request.url_for("dashboard_manifest", batch_id=batch_id)
    link = dashboard_links.sign(request, session, context, url, f"manifest:{batch_id}")
    return SignedLink(url=link.url, expires_at=link.expires_at)


@router.get(
    "/dashboard/batches/{batch_id}/manifest.jsonl",
    include_in_schema=False,
    name="dashboard_manifest",
)
def dashboard_manifest(
    batch_id: str,
    session: SessionDep,
    context: Context,
    request: Request,
    k: str | None = None,
    exp: int | None = None,
    sig: str | None = None,
) -> StreamingResponse:
    """``GET /v1/batches/{id}/manifest`` for a signed link, as a download."""
    resource = f"manifest:{batch_id}"
    principal = dashboard_links.verify(request, session, context, resource, k, exp, sig)
    _batch(session, scope_of(principal), batch_id)
    return StreamingResponse(
        manifest.jsonl(context.settings.database_url, batch_id, context.store),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="{batch_id}.manifest.jsonl"'},
    )
