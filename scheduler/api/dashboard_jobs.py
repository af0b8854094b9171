"""The console's jobs: a filtered list by cursor, one job in full (parameters, events, stage
timings, attempts, error), and the actions on it (cancel, retry, delete), for a tenant's key
(its own jobs) or an operator's (every tenant's: ``scope`` None).

The list costs the same at any table size. It walks one index newest first, ``(created_at,
id)`` descending: ``(tenant, created_at)`` for a tenant, ``(batch_id, created_at)`` with a
batch, ``(created_at)`` for an operator's look at every tenant; the cursor is the last row's
``(created_at, id)``, so a page starts where the last one stopped (keyset, never an offset).
The filters that no such index serves (state, model, prompt text) are applied to at most
``SCAN_LIMIT`` rows of that walk per request: a page holds the matches among them, and when
the walk stopped at its bound before a page was full, ``truncated_scan`` says so and
``next_cursor`` continues the search from where it stopped. Prompt search is a
case-insensitive substring (``LIKE``) over those rows only.

Each walk is an index range with no sort once the jobs table has ``(tenant, created_at,
id)``, ``(batch_id, created_at, id)`` and ``(created_at, id)``, each partial on ``deleted_at
IS NULL``: at 1,000,000 rows on PostgreSQL every list request is then under 5 ms. Without
the last two, a batch's list and an operator's look at every tenant sort the batch's (or
the table's) rows: 180 and 200 ms there.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session

from fvb_core.api_keys import Principal
from fvb_core.db import transitions
from fvb_core.db.models import Job, JobEvent, utcnow
from fvb_core.jobs import UNFINISHED_STATUSES, JobParams, JobResult, JobStatus
from scheduler.api import jobs
from scheduler.api.context import ApiContext
from scheduler.api.errors import ApiError
from scheduler.api.schemas import API_STATUS, ApiStatus, is_expired, unix

log = logging.getLogger(__name__)

#: Rows of the driving index one list request looks at when a filter no index serves applies.
SCAN_LIMIT = 5000
MAX_PAGE = 100
MAX_SEARCH_CHARS = 200
#: Events shown on a job's page (its first ones: a job has a handful per attempt).
MAX_EVENTS = 500
#: The prompt as the list shows it (the job's page shows it whole).
PROMPT_PREVIEW_CHARS = 160
#: The console's state filter: job states (``cancelled`` apart from ``failed``).
STATES = tuple(status.value for status in JobStatus)


def scope_of(principal: Principal) -> str | None:
    """The tenant whose jobs the principal sees; None for an operator: every tenant's."""
    return None if principal.operator else principal.tenant


# --- the list ----------------------------------------------------------------------------


@dataclass(frozen=True)
class JobFilters:
    states: tuple[str, ...] = ()
    model: str | None = None
    batch_id: str | None = None
    #: An operator's choice of tenant (a tenant's key is always scoped to its own).
    tenant: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    search: str | None = None

    @property
    def unindexed(self) -> bool:
        return bool(self.states or self.model or self.search)


def parse_filters(
    principal: Principal,
    *,
    state: str | None,
    model: str | None,
    batch_id: str | None,
    tenant: str | None,
    created_after: int | None,
    created_before: int | None,
    q: str | None,
) -> JobFilters:
    """The query parameters checked (400 naming the field); empty ones are "not given"."""
    states: tuple[str, ...] = ()
    if state:
        states = tuple(s.strip() for s in state.split(",") if s.strip())
        unknown = [s for s in states if s not in STATES]
        if unknown:
            raise ApiError.invalid(
                "state", f"unknown state {unknown[0]!r}; use one or more of {list(STATES)}"
            )
    if tenant and not principal.operator and tenant != principal.tenant:
        raise ApiError(
            403,
            "Filtering by another tenant needs an operator key (fvb keys create --operator).",
            param="tenant",
            code="operator_key_required",
        )
    q = (q or "").strip() or None
    if q is not None and len(q) > MAX_SEARCH_CHARS:
        raise ApiError.invalid("q", f"q must be at most {MAX_SEARCH_CHARS} characters")
    return JobFilters(
        states=states,
        model=model or None,
        batch_id=batch_id or None,
        tenant=tenant or None,
        created_after=_moment("created_after", created_after),
        created_before=_moment("created_before", created_before),
        search=q,
    )


def _moment(name: str, value: int | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError) as err:
        raise ApiError.invalid(name, f"{name} must be a unix time in seconds") from err


def encode_cursor(created_at: datetime, job_id: str) -> str:
    micros = int(created_at.timestamp() * 1_000_000)
    return base64.urlsafe_b64encode(f"{micros}.{job_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        micros, job_id = raw.split(".", 1)
        moment = datetime.fromtimestamp(int(micros) / 1_000_000, UTC)
    except (ValueError, UnicodeDecodeError, binascii.Error, OverflowError, OSError) as err:
        raise ApiError.invalid("cursor", "cursor is not one this API gave out") from err
    if not job_id:
        raise ApiError.invalid("cursor", "cursor is not one this API gave out")
    return moment, job_id


class JobListRow(BaseModel):
    id: str
    tenant: str
    model: str
    #: The API status; ``state`` is the job's own (a cancelled job is ``failed`` in the API).
    status: ApiStatus
    state: str
    progress: int
    attempt: int
    max_attempts: int
    batch_id: str | None
    prompt: str | None
    created_at: int
    started_at: int | None
    finished_at: int | None
    #: Run time of the current attempt: finished (or, while running, now) minus started.
    duration_s: float | None
    error_code: str | None
    cancel_requested: bool
    worker_id: str | None


class JobPage(BaseModel):
    object: str = "list"
    data: list[JobListRow]
    #: Give it back as ``cursor`` for the next (older) page; None: nothing older.
    next_cursor: str | None
    has_more: bool
    #: The page stopped at ``scan_limit`` rows looked at, not at ``limit`` matches: older
    #: jobs were not searched yet (``next_cursor`` goes on from there).
    truncated_scan: bool
    scan_limit: int
    #: Whose jobs: the tenant, or None for an operator's look at every tenant.
    scope: str | None


_LIST_COLUMNS = (
    Job.id,
    Job.tenant,
    Job.model,
    Job.status,
    Job.progress,
    Job.attempt,
    Job.max_attempts,
    Job.batch_id,
    Job.params,
    Job.created_at,
    Job.started_at,
    Job.finished_at,
    Job.error_code,
    Job.cancel_requested,
    Job.worker_id,
)


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _prompt(column: Any) -> ColumnElement:
    return func.lower(column["prompt"].as_string())


def list_page(
    session: Session,
    scope: str | None,
    filters: JobFilters,
    cursor: str | None,
    limit: int,
) -> JobPage:
    """One page of jobs, newest first, after ``cursor`` (see the module's docstring)."""
    if not 1 <= limit <= MAX_PAGE:
        raise ApiError.invalid("limit", f"limit must be between 1 and {MAX_PAGE}, got {limit}")
    tenant = scope if scope is not None else filters.tenant
    walk = select(*_LIST_COLUMNS).where(Job.deleted_at.is_(None))
    if tenant is not None:
        walk = walk.where(Job.tenant == tenant)
    if filters.batch_id is not None:
        walk = walk.where(Job.batch_id == filters.batch_id)
    if filters.created_after is not None:
        walk = walk.where(Job.created_at >= filters.created_after)
    if filters.created_before is not None:
        walk = walk.where(Job.created_at < filters.created_before)
    if cursor:
        moment, after_id = decode_cursor(cursor)
        # ``created_at <= t`` bounds the index range; the OR only breaks ties within it.
        walk = walk.where(Job.created_at <= moment, or_(Job.created_at < moment, Job.id < after_id))
    walk = walk.order_by(Job.created_at.desc(), Job.id.desc())
    truncated = False
    if not filters.unindexed:
        rows = session.execute(walk.limit(limit + 1)).all()
        has_more = len(rows) > limit
        rows = rows[:limit]
        last = (rows[-1].created_at, rows[-1].id) if has_more else None
    else:
        window = walk.limit(SCAN_LIMIT).subquery()
        matches = select(window)
        if filters.states:
            matches = matches.where(window.c.status.in_(filters.states))
        if filters.model:
            matches = matches.where(window.c.model == filters.model)
        if filters.search:
            pattern = f"%{_escape_like(filters.search.lower())}%"
            matches = matches.where(_prompt(window.c.params).like(pattern, escape="\\"))
        matches = matches.order_by(window.c.created_at.desc(), window.c.id.desc())
        rows = session.execute(matches.limit(limit + 1)).all()
        if len(rows) > limit:
            rows, has_more = rows[:limit], True
            last = (rows[-1].created_at, rows[-1].id)
        else:
            # Fewer matches than a page: more may hide past the scan's bound, if it was hit
            # (its last row is where the next request goes on).
            bound = session.execute(
                walk.with_only_columns(Job.created_at, Job.id).offset(SCAN_LIMIT - 1).limit(1)
            ).one_or_none()
            has_more = truncated = bound is not None
            last = (bound.created_at, bound.id) if bound is not None else None
    session.commit()
    now = utcnow()
    return JobPage(
        data=[_list_row(row, now) for row in rows],
        next_cursor=encode_cursor(*last) if last else None,
        has_more=has_more,
        truncated_scan=truncated,
        scan_limit=SCAN_LIMIT,
        scope=scope,
    )


def run_seconds(
    status: str, started: datetime | None, finished: datetime | None, now: datetime
) -> float | None:
    """Run time of the current attempt: finished (or, while running, now) minus started."""
    if started is None:
        return None
    if status == JobStatus.RUNNING:
        return round((now - started).total_seconds(), 3)
    if JobStatus(status).is_final and finished is not None:
        return round((finished - started).total_seconds(), 3)
    return None  # queued, perhaps again after a failed attempt: not running now


def _list_row(row: Any, now: datetime) -> JobListRow:
    prompt = (row.params or {}).get("prompt")
    if isinstance(prompt, str) and len(prompt) > PROMPT_PREVIEW_CHARS:
        prompt = prompt[: PROMPT_PREVIEW_CHARS - 1] + "…"
    return JobListRow(
        id=row.id,
        tenant=row.tenant,
        model=row.model,
        status=API_STATUS[row.status],
        state=row.status,
        progress=max(0, min(100, int(row.progress or 0))),
        attempt=row.attempt,
        max_attempts=row.max_attempts,
        batch_id=row.batch_id,
        prompt=prompt if isinstance(prompt, str) else None,
        created_at=unix(row.created_at) or 0,
        started_at=unix(row.started_at),
        finished_at=unix(row.finished_at),
        duration_s=run_seconds(row.status, row.started_at, row.finished_at, now),
        error_code=row.error_code,
        cancel_requested=bool(row.cancel_requested),
        worker_id=row.worker_id,
    )


# --- one job -----------------------------------------------------------------------------


class JobEventRow(BaseModel):
    at: float
    from_status: str | None
    to_status: str
    attempt: int
    detail: str | None


class JobOutputInfo(BaseModel):
    uri: str
    bytes: int | None
    sha256: str | None


class JobActions(BaseModel):
    """What the console may do with the job now (the buttons it shows)."""

    cancel: bool
    retry: bool
    delete: bool
    #: The video can be played (``POST /dashboard/jobs/{id}/media`` gives its URL).
    play: bool


class JobDetail(BaseModel):
    id: str
    tenant: str
    model: str
    pool: str
    status: ApiStatus
    state: str
    progress: int
    priority: int
    attempt: int
    max_attempts: int
    batch_id: str | None
    item_key: str | None
    prompt: str | None
    negative_prompt: str | None
    #: Every generation parameter, as stored (``Job.params``).
    params: dict[str, Any]
    size: str
    seconds: str
    #: Seconds per pipeline stage of the attempt that succeeded (text_encode, denoise, ...).
    stage_timings: dict[str, float] | None
    #: What the worker recorded of the render: frames, fps, width, height, revision, GPU.
    result: dict[str, Any]
    worker_id: str | None
    error_code: str | None
    error_message: str | None
    cancel_requested: bool
    created_at: int
    started_at: int | None
    heartbeat_at: int | None
    finished_at: int | None
    #: created -> the succeeding attempt's start, and that attempt's run time.
    queue_wait_s: float | None
    duration_s: float | None
    expires_at: int | None
    expired: bool
    output: JobOutputInfo | None
    events: list[JobEventRow]
    events_truncated: bool
    actions: JobActions


def find(session: Session, scope: str | None, job_id: str) -> Job:
    """The job if the scope sees it (404 otherwise, as for a deleted one)."""
    return jobs.get(session, scope, job_id)


def detail(session: Session, context: ApiContext, scope: str | None, job_id: str) -> JobDetail:
    job = find(session, scope, job_id)
    events = session.execute(
        select(
            JobEvent.at, JobEvent.from_status, JobEvent.to_status, JobEvent.attempt, JobEvent.detail
        )
        .where(JobEvent.job_id == job_id)
        .order_by(JobEvent.id)
        .limit(MAX_EVENTS + 1)
    ).all()
    session.commit()
    params = JobParams.from_json(job.params)
    state = JobStatus(job.status)
    succeeded = state == JobStatus.SUCCEEDED
    expired = succeeded and is_expired(job)
    now = utcnow()
    output = None
    if succeeded and job.output_key:
        output = JobOutputInfo(
            uri=context.store.uri(job.output_key), bytes=job.output_bytes, sha256=job.output_sha256
        )
    queue_wait = None
    if job.started_at is not None and job.created_at is not None:
        queue_wait = round((job.started_at - job.created_at).total_seconds(), 3)
    return JobDetail(
        id=job.id,
        tenant=job.tenant,
        model=job.model,
        pool=job.pool,
        status=API_STATUS[job.status],
        state=job.status,
        progress=max(0, min(100, int(job.progress or 0))),
        priority=job.priority,
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        batch_id=job.batch_id,
        item_key=job.idempotency_key if job.batch_id else None,
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        params=dict(job.params or {}),
        size=params.size,
        seconds=params.shown_seconds,
        stage_timings=job.stage_timings or None,
        result=JobResult.from_json(job.result).to_json(),
        worker_id=job.worker_id,
        error_code=job.error_code,
        error_message=job.error_message,
        cancel_requested=bool(job.cancel_requested),
        created_at=unix(job.created_at) or 0,
        started_at=unix(job.started_at),
        heartbeat_at=unix(job.heartbeat_at),
        finished_at=unix(job.finished_at),
        queue_wait_s=queue_wait,
        duration_s=run_seconds(job.status, job.started_at, job.finished_at, now),
        expires_at=unix(job.expires_at) if succeeded else None,
        expired=expired,
        output=output,
        events=[
            JobEventRow(
                at=round(e.at.timestamp(), 3),
                from_status=e.from_status,
                to_status=e.to_status,
                attempt=e.attempt,
                detail=e.detail,
            )
            for e in events[:MAX_EVENTS]
        ],
        events_truncated=len(events) > MAX_EVENTS,
        actions=JobActions(
            cancel=not state.is_final and not job.cancel_requested,
            retry=state in (JobStatus.FAILED, JobStatus.CANCELLED),
            delete=True,
            play=succeeded and bool(job.output_key) and not expired,
        ),
    )


# --- actions -----------------------------------------------------------------------------


def cancel(session: Session, scope: str | None, job_id: str) -> None:
    """Queued: cancelled now; running: flagged, the worker stops at its next step. A finished
    job is 409 (there is nothing left to cancel)."""
    job = find(session, scope, job_id)
    if JobStatus(job.status).is_final:
        raise ApiError(
            409,
            f"Video '{job_id}' is already {API_STATUS[job.status]} ({job.status}); "
            "only a queued or running video can be cancelled",
            param="video_id",
            code="video_finished",
        )
    jobs.cancel(session, scope, job_id)


def retry(session: Session, context: ApiContext, principal: Principal, job_id: str) -> None:
    """A failed or cancelled job queued again as a new attempt of the same video (same id,
    ``job_max_attempts`` more attempts), admitted like a new video of its tenant: its own
    key's limit for a tenant, the deployment's for an operator acting on any tenant's job
    (429 when that tenant has no room). Any other state is 409."""
    scope = scope_of(principal)
    job = find(session, scope, job_id)
    if job.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
        raise ApiError(
            409,
            f"Video '{job_id}' is {job.status}; only a failed or cancelled video can be retried",
            param="video_id",
            code="video_not_retryable",
        )
    owner = principal if job.tenant == principal.tenant else Principal(job.tenant)
    jobs.admit(session, context, owner, 1)
    retried = transitions.retry_job(session, job_id, scope, context.settings.job_max_attempts)
    session.commit()
    if not retried:  # it changed state (or was deleted) since we looked
        raise ApiError(
            409,
            f"Video '{job_id}' changed meanwhile; it is no longer failed or cancelled",
            param="video_id",
            code="video_not_retryable",
        )
    log.info("video %s queued again from the console (tenant %s)", job_id, job.tenant)


def delete(session: Session, context: ApiContext, scope: str | None, job_id: str) -> None:
    """``DELETE /v1/videos/{id}`` for the scope: cancel if unfinished, delete its stored
    objects, hide the job."""
    jobs.delete(session, context, scope, job_id)


def video_of(session: Session, scope: str | None, job_id: str) -> Job:
    """The job whose video the console plays: completed, stored, not expired (409/410)."""
    job = find(session, scope, job_id)
    if job.status != JobStatus.SUCCEEDED or not job.output_key:
        raise ApiError(
            409,
            f"Video '{job_id}' is {API_STATUS[job.status]}; it plays once it is completed",
            param="video_id",
            code="video_not_ready" if job.status in UNFINISHED_STATUSES else "video_failed",
        )
    if is_expired(job):
        raise ApiError(
            410,
            f"Video '{job_id}' expired; its content was deleted",
            param="video_id",
            code="video_expired",
        )
    return job
