"""What ``GET /dashboard/data`` shows one tenant: its jobs by status, its throughput and run
times, the workers running its jobs, its latest jobs and batches; and, for every GPU pool,
how many jobs wait and run in total (numbers only: nothing else about other tenants).

A few queries in one session, each over a roll-up table (``fvb_core/db/rollup.py``: the
counts by status and per pool), an index range (the last hour's finished jobs, the running
ones, the newest rows) or a bounded select; nothing scans the jobs table. Counts and the
table cover the videos the API still lists (deleted ones excluded); throughput and
run times cover work finished, deleted since or not, so a client that deletes each video
after downloading it still sees its rate. Percentiles are taken here rather than in SQL
(SQLite has none) from the last hour's run times: one row of two timestamps per job.
"""

from __future__ import annotations

import math
from collections import Counter
from datetime import datetime, timedelta

from pydantic import BaseModel
from sqlalchemy import distinct, func, select
from sqlalchemy.orm import Session

from fvb_core.db import rollup
from fvb_core.db.models import Batch, Job, utcnow
from fvb_core.jobs import JobStatus
from scheduler.api import fleet_view
from scheduler.api.batches import request_counts
from scheduler.api.context import ApiContext
from scheduler.api.dashboard_jobs import run_seconds
from scheduler.api.errors import ApiError
from scheduler.api.fleet_view import FleetWorker
from scheduler.api.schemas import API_STATUS, JOB_STATUSES, ApiStatus, BatchObject, unix

#: Windows (minutes) over which completed jobs per minute are reported.
THROUGHPUT_WINDOWS_MIN = (10, 60)
#: Window (minutes) of the succeeded jobs whose run times give the median and p95, and the
#: most of them (the latest) that are read.
RUN_TIME_WINDOW_MIN = 60
RUN_TIME_SAMPLES = 1000
#: Minutes the charts cover.
CHART_MINUTES = 60
LATEST_JOBS = 50
LATEST_BATCHES = 10
#: The table's filter: the API statuses (``failed`` includes cancelled, as in the API), and
#: ``cancelled`` alone.
STATUS_FILTERS: dict[str, tuple[str, ...]] = {
    **JOB_STATUSES,
    "cancelled": (JobStatus.CANCELLED,),
}
UNKNOWN_POOL = "unknown"


class StatusCounts(BaseModel):
    """The tenant's jobs by API status; ``failed`` includes the ``cancelled`` ones."""

    queued: int = 0
    in_progress: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    total: int = 0


class PoolDepth(BaseModel):
    """Jobs of every tenant waiting for and running on one GPU pool, and the tenant's share."""

    pool: str
    queue: str
    queued: int = 0
    running: int = 0
    yours_queued: int = 0
    yours_running: int = 0


class Throughput(BaseModel):
    window_minutes: int
    completed: int
    per_minute: float


class RunTime(BaseModel):
    """Claim to success of the succeeding attempt (queue wait excluded), in seconds."""

    window_minutes: int
    samples: int
    median_s: float | None
    p95_s: float | None


class WorkerJob(BaseModel):
    id: str
    model: str
    progress: int
    attempt: int
    started_at: int | None
    heartbeat_at: int
    cancel_requested: bool


class Worker(BaseModel):
    worker_id: str
    heartbeat_at: int
    #: The tenant's running jobs this worker heart-beats for, newest heartbeat first.
    jobs: list[WorkerJob]


class JobRow(BaseModel):
    id: str
    tenant: str
    model: str
    #: The API status; ``state`` tells a cancelled job from a failed one.
    status: ApiStatus
    state: str
    progress: int
    attempt: int
    max_attempts: int
    created_at: int
    started_at: int | None
    finished_at: int | None
    heartbeat_at: int | None
    #: Run time of the current attempt: finished (or, while running, now) minus started.
    duration_s: float | None
    error_code: str | None
    cancel_requested: bool
    worker_id: str | None


class MinuteStats(BaseModel):
    """One minute of the last hour: jobs that finished in it, and their latencies."""

    minute: int
    completed: int = 0
    failed: int = 0
    queue_wait_p50_s: float | None = None
    queue_wait_p95_s: float | None = None
    render_p50_s: float | None = None
    render_p95_s: float | None = None


class QueueDepthSample(BaseModel):
    minute: int
    pool: str
    queued: int
    running: int


class Charts(BaseModel):
    per_minute: list[MinuteStats]
    queue_depth: list[QueueDepthSample]


class DashboardData(BaseModel):
    tenant: str
    #: An operator's view: the numbers, jobs, batches and workers of every tenant.
    every_tenant: bool = False
    generated_at: int
    heartbeat_timeout_s: float
    counts: StatusCounts
    pools: list[PoolDepth]
    throughput: list[Throughput]
    run_time: RunTime
    workers: list[Worker]
    #: Distinct workers of every tenant with a heartbeat in the last heartbeat_timeout_s.
    live_workers_all_tenants: int
    status_filter: str | None
    jobs: list[JobRow]
    #: The tenant's newest batches, as ``GET /v1/batches/{id}`` shows each.
    batches: list[BatchObject]
    #: The last hour, a point a minute (the tenant's jobs; queue depth: every tenant's).
    charts: Charts
    #: Live workers, idle ones too (a tenant: those running its jobs).
    fleet: list[FleetWorker]


def parse_status_filter(value: str | None) -> str | None:
    if not value:
        return None
    if value not in STATUS_FILTERS:
        raise ApiError.invalid(
            "status", f"unknown status {value!r}; use one of {sorted(STATUS_FILTERS)}"
        )
    return value


def percentile(ordered: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default) of sorted values."""
    if not ordered:
        return None
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _counts(session: Session, by_key: Counter) -> StatusCounts:
    """The cards, from the roll-ups (``by_key``: (tenant, model, status) -> jobs)."""
    counts = StatusCounts()
    for (_tenant, _model, status), count in by_key.items():
        api_status = API_STATUS.get(status)
        if api_status is not None:
            setattr(counts, api_status, getattr(counts, api_status) + count)
        if status == JobStatus.CANCELLED:
            counts.cancelled += count
        counts.total += count
    return counts


def _pools(context: ApiContext, tenant: str | None, every: Counter) -> list[PoolDepth]:
    """Queued and running jobs per pool (every tenant's), and ``tenant``'s share."""
    pools = {
        served.pool: PoolDepth(pool=served.pool, queue=served.queue)
        for served in context.models.values()
    }
    for (owner, model, status), count in every.items():
        if status not in (JobStatus.QUEUED, JobStatus.RUNNING):
            continue
        served = context.models.get(model)
        name = served.pool if served else UNKNOWN_POOL
        pool = pools.setdefault(name, PoolDepth(pool=name, queue=f"gpu.{name}"))
        mine = count if tenant is None or owner == tenant else 0
        if status == JobStatus.QUEUED:
            pool.queued += count
            pool.yours_queued += mine
        else:
            pool.running += count
            pool.yours_running += mine
    return [pools[name] for name in sorted(pools)]


def _throughput(by_minute: dict[datetime, rollup.Minute], now: datetime) -> list[Throughput]:
    """Completed jobs over each window, from the minute roll-ups (to the minute)."""
    result = []
    for minutes in THROUGHPUT_WINDOWS_MIN:
        since = (now - timedelta(minutes=minutes)).replace(second=0, microsecond=0)
        done = sum(m.completed for at, m in by_minute.items() if at >= since)
        result.append(
            Throughput(window_minutes=minutes, completed=done, per_minute=round(done / minutes, 3))
        )
    return result


def _mine(tenant: str | None) -> list:
    """The tenant filter (none for an operator's view of every tenant)."""
    return [] if tenant is None else [Job.tenant == tenant]


def _run_time(session: Session, tenant: str | None, now: datetime) -> RunTime:
    """Exact median and p95 of the window's latest ``RUN_TIME_SAMPLES`` successes (an
    index walk back from now, bounded however many finish an hour)."""
    rows = session.execute(
        select(Job.started_at, Job.finished_at)
        .where(
            *_mine(tenant),
            Job.finished_at >= now - timedelta(minutes=RUN_TIME_WINDOW_MIN),
            Job.status == JobStatus.SUCCEEDED,
            Job.started_at.is_not(None),
        )
        .order_by(Job.finished_at.desc())
        .limit(RUN_TIME_SAMPLES)
    ).all()
    durations = sorted(
        (end - start).total_seconds() for start, end in rows if start is not None and end
    )
    median, p95 = percentile(durations, 0.5), percentile(durations, 0.95)
    return RunTime(
        window_minutes=RUN_TIME_WINDOW_MIN,
        samples=len(durations),
        median_s=round(median, 3) if median is not None else None,
        p95_s=round(p95, 3) if p95 is not None else None,
    )


def _workers(session: Session, tenant: str | None, cutoff: datetime) -> list[Worker]:
    rows = session.execute(
        select(
            Job.worker_id,
            Job.id,
            Job.model,
            Job.progress,
            Job.attempt,
            Job.started_at,
            Job.heartbeat_at,
            Job.cancel_requested,
        )
        .where(
            *_mine(tenant),
            Job.status == JobStatus.RUNNING,
            Job.worker_id.is_not(None),
            Job.heartbeat_at >= cutoff,
        )
        .order_by(Job.heartbeat_at.desc(), Job.id)
    ).all()
    workers: dict[str, Worker] = {}
    for row in rows:
        heartbeat = unix(row.heartbeat_at) or 0
        worker = workers.setdefault(
            row.worker_id, Worker(worker_id=row.worker_id, heartbeat_at=heartbeat, jobs=[])
        )
        worker.jobs.append(
            WorkerJob(
                id=row.id,
                model=row.model,
                progress=max(0, min(100, int(row.progress or 0))),
                attempt=row.attempt,
                started_at=unix(row.started_at),
                heartbeat_at=heartbeat,
                cancel_requested=bool(row.cancel_requested),
            )
        )
    return sorted(workers.values(), key=lambda worker: worker.worker_id)


def _live_workers(session: Session, cutoff: datetime) -> int:
    return session.execute(
        select(func.count(distinct(Job.worker_id))).where(
            Job.status == JobStatus.RUNNING,
            Job.worker_id.is_not(None),
            Job.heartbeat_at >= cutoff,
        )
    ).scalar_one()


def _latest_jobs(
    session: Session, tenant: str | None, status_filter: str | None, now: datetime
) -> list[JobRow]:
    query = select(
        Job.id,
        Job.tenant,
        Job.model,
        Job.status,
        Job.progress,
        Job.attempt,
        Job.max_attempts,
        Job.created_at,
        Job.started_at,
        Job.finished_at,
        Job.heartbeat_at,
        Job.error_code,
        Job.cancel_requested,
        Job.worker_id,
    ).where(*_mine(tenant), Job.deleted_at.is_(None))
    if status_filter is not None:
        query = query.where(Job.status.in_(STATUS_FILTERS[status_filter]))
    rows = session.execute(
        query.order_by(Job.created_at.desc(), Job.id.desc()).limit(LATEST_JOBS)
    ).all()
    table = []
    for row in rows:
        duration = run_seconds(row.status, row.started_at, row.finished_at, now)
        table.append(
            JobRow(
                id=row.id,
                tenant=row.tenant,
                model=row.model,
                status=API_STATUS[row.status],
                state=row.status,
                progress=max(0, min(100, int(row.progress or 0))),
                attempt=row.attempt,
                max_attempts=row.max_attempts,
                created_at=unix(row.created_at) or 0,
                started_at=unix(row.started_at),
                finished_at=unix(row.finished_at),
                heartbeat_at=unix(row.heartbeat_at),
                duration_s=duration,
                error_code=row.error_code,
                cancel_requested=bool(row.cancel_requested),
                worker_id=row.worker_id,
            )
        )
    return table


def _batches(session: Session, tenant: str | None) -> list[BatchObject]:
    """The newest LATEST_BATCHES batches with their videos counted by status, in one query
    (grouped by the batch's primary key, which the other batch columns depend on)."""
    latest = (
        select(Batch.id)
        .where(*([] if tenant is None else [Batch.tenant == tenant]))
        .order_by(Batch.created_at.desc(), Batch.id.desc())
        .limit(LATEST_BATCHES)
        .subquery()
    )
    rows = session.execute(
        select(
            Batch.id, Batch.status, Batch.created_at, Batch.params, Job.status, func.count(Job.id)
        )
        .join(latest, latest.c.id == Batch.id)
        .outerjoin(Job, (Job.batch_id == Batch.id) & Job.deleted_at.is_(None))
        .group_by(Batch.id, Job.status)
    ).all()
    batches: dict[str, tuple] = {}
    by_status: dict[str, dict[str, int]] = {}
    for batch_id, status, created_at, params, job_status, count in rows:
        batches[batch_id] = (batch_id, status, created_at, params)
        if job_status is not None:
            by_status.setdefault(batch_id, {})[job_status] = count
    ordered = sorted(batches.values(), key=lambda b: (b[2], b[0]), reverse=True)
    return [
        BatchObject.from_batch(
            Batch(id=batch_id, status=status, created_at=created_at, params=params),
            request_counts(by_status.get(batch_id, {})),
        )
        for batch_id, status, created_at, params in ordered
    ]


def _per_minute(by_minute: dict[datetime, rollup.Minute], first: datetime) -> list[MinuteStats]:
    """The last hour a minute at a time, from the minute roll-ups: counts exact, p50 and
    p95 estimated from each minute's histogram (``rollup.percentile_of``)."""
    points = []
    for i in range(CHART_MINUTES + 1):
        at = first + timedelta(minutes=i)
        minute = by_minute.get(at, rollup.Minute())
        point = MinuteStats(minute=unix(at) or 0, completed=minute.completed, failed=minute.failed)
        for name, buckets in (("queue_wait", minute.queue_wait), ("render", minute.render)):
            for q, label in ((0.5, "p50"), (0.95, "p95")):
                value = rollup.percentile_of(buckets, q)
                setattr(point, f"{name}_{label}_s", round(value, 3) if value is not None else None)
        points.append(point)
    return points


def _queue_depth(session: Session, now: datetime) -> list[QueueDepthSample]:
    since = now - timedelta(minutes=CHART_MINUTES)
    return [
        QueueDepthSample(
            minute=unix(s.minute) or 0, pool=s.pool, queued=s.queued, running=s.running
        )
        for s in rollup.queue_samples(session, since)
    ]


def collect(
    session: Session,
    context: ApiContext,
    tenant: str,
    status_filter: str | None = None,
    every_tenant: bool = False,
) -> DashboardData:
    """Everything the dashboard shows `tenant` (``every_tenant``: an operator's view of the
    whole service), as of now (one read, in the request's session)."""
    shown = None if every_tenant else tenant
    now = utcnow()
    timeout_s = context.settings.heartbeat_timeout_s
    heartbeat_cutoff = now - timedelta(seconds=timeout_s)
    try:
        rollup.snapshot(session)  # the roll-ups and their pending events: one snapshot
        pending = rollup.pending(session)
        every = rollup.job_counts(session, None, pending)
        mine = Counter({k: n for k, n in every.items() if shown is None or k[0] == shown})
        first = (now - timedelta(minutes=CHART_MINUTES)).replace(second=0, microsecond=0)
        by_minute = rollup.minutes(session, first, shown, pending)
        return DashboardData(
            tenant=tenant,
            every_tenant=every_tenant,
            generated_at=unix(now) or 0,
            heartbeat_timeout_s=timeout_s,
            counts=_counts(session, mine),
            pools=_pools(context, shown, every),
            throughput=_throughput(by_minute, now),
            run_time=_run_time(session, shown, now),
            workers=_workers(session, shown, heartbeat_cutoff),
            live_workers_all_tenants=_live_workers(session, heartbeat_cutoff),
            status_filter=status_filter,
            jobs=_latest_jobs(session, shown, status_filter, now),
            batches=_batches(session, shown),
            charts=Charts(
                per_minute=_per_minute(by_minute, first),
                queue_depth=_queue_depth(session, now),
            ),
            fleet=fleet_view.fleet(session, context.settings, shown, now),
        )
    finally:
        session.commit()
