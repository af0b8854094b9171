"""The console's workers: every live worker, idle ones too, with what it said of itself at
its last beat (``Worker.stats``: GPUs), the job it runs now, the jobs it finished and the
part of the last ten minutes it spent rendering.

Four bounded reads: the workers that beat lately (a row per consumer), the running jobs
(the status index), the models their job processes hold, and the jobs finished in the last
ten minutes (``ix_jobs_finished``: the fleet's recent work, not the table). A tenant sees
the workers running its jobs (and none of their other jobs' ids); an operator sees the
whole fleet.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fvb_core.db import fleet as registry
from fvb_core.db.models import Job, Worker, utcnow
from fvb_core.jobs import JobStatus
from fvb_core.settings import Settings
from scheduler.api.schemas import unix

#: The window of ``jobs_done`` and ``busy_fraction_10m``.
BUSY_WINDOW = timedelta(minutes=10)
#: Workers silent for longer than this leave the list (stale ones before that are flagged).
SHOWN_FOR = timedelta(minutes=10)


class GpuStat(BaseModel):
    index: int
    name: str
    memory_used_mib: int
    memory_total_mib: int
    utilization_pct: int
    temperature_c: int


class CurrentJob(BaseModel):
    id: str
    model: str
    progress: int


class FleetWorker(BaseModel):
    worker_id: str
    host: str
    pool: str
    gpus: list[GpuStat]
    #: None when idle (or, for a tenant, busy with another tenant's job).
    current_job: CurrentJob | None
    #: Jobs it finished (any outcome) in the last 10 minutes.
    jobs_done: int
    #: Time spent rendering in the last 10 minutes, over 10 minutes (per job process).
    busy_fraction_10m: float
    heartbeat_at: int
    #: No beat within the scheduler's ``worker_timeout_s``: it gets no more work.
    stale: bool
    loaded_models: list[str]


def _overlap(start: datetime | None, end: datetime, since: datetime) -> float:
    if start is None:
        return 0.0
    return max(0.0, (end - max(start, since)).total_seconds())


def _busy_seconds(session: Session, since: datetime) -> Any:
    """SQL: seconds of ``[max(started_at, since), finished_at]`` (the database does the sum)."""
    start = (
        func.max(Job.started_at, since)
        if _sqlite(session)
        else func.greatest(Job.started_at, since)
    )
    if _sqlite(session):
        return (func.julianday(Job.finished_at) - func.julianday(start)) * 86400.0
    return func.extract("epoch", Job.finished_at - start)


def _sqlite(session: Session) -> bool:
    return session.get_bind().dialect.name == "sqlite"


def fleet(
    session: Session, settings: Settings, tenant: str | None, now: datetime | None = None
) -> list[FleetWorker]:
    now = now or utcnow()
    since = now - BUSY_WINDOW
    workers = list(
        session.execute(
            select(Worker)
            .where(Worker.stopped_at.is_(None), Worker.heartbeat_at >= now - SHOWN_FOR)
            .order_by(Worker.pool, Worker.id)
        ).scalars()
    )
    if not workers:
        return []
    children = [w for worker in workers for w in (worker.stats or {}).get("job_workers", [])]
    running: dict[str, list[Any]] = {}
    for row in session.execute(
        select(Job.id, Job.worker_id, Job.model, Job.progress, Job.tenant, Job.started_at).where(
            Job.status == JobStatus.RUNNING
        )
    ).all():
        running.setdefault(row.worker_id or "", []).append(row)
    done: dict[str, tuple[int, float]] = {}
    if children:
        # Summed by the database over the last ten minutes' finishes of these processes.
        for worker_id, count, seconds in session.execute(
            select(Job.worker_id, func.count(), func.sum(_busy_seconds(session, since)))
            .where(Job.finished_at >= since, Job.worker_id.in_(children))
            .group_by(Job.worker_id)
        ).all():
            done[worker_id] = (count, float(seconds or 0.0))
    models = registry.loaded_models(session, children)
    shown = []
    for worker in workers:
        stats = worker.stats or {}
        processes = stats.get("job_workers", [])
        current = [row for w in processes for row in running.get(w, [])]
        if tenant is not None and not any(row.tenant == tenant for row in current):
            continue
        busy = sum(_overlap(row.started_at, now, since) for row in current)
        busy += sum(done.get(w, (0, 0.0))[1] for w in processes)
        job = next((row for row in current if tenant is None or row.tenant == tenant), None)
        shown.append(
            FleetWorker(
                worker_id=worker.id,
                host=worker.host,
                pool=worker.pool,
                gpus=[GpuStat(**gpu) for gpu in stats.get("gpus", [])],
                current_job=CurrentJob(id=job.id, model=job.model, progress=job.progress or 0)
                if job is not None
                else None,
                jobs_done=sum(done.get(w, (0, 0.0))[0] for w in processes),
                busy_fraction_10m=round(
                    min(1.0, busy / (BUSY_WINDOW.total_seconds() * max(1, len(processes)))), 4
                ),
                heartbeat_at=unix(worker.heartbeat_at) or 0,
                stale=worker.heartbeat_at < now - timedelta(seconds=settings.worker_timeout_s),
                loaded_models=sorted({m for w in processes for m in models.get(w, [])}),
            )
        )
    return shown
