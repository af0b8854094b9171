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
from sqlalchemy import select
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


def fleet(
    session: Session, settings: Settings, tenant: str | None, now: datetime | None = None
) -> list[FleetWorker]:
    now = now or utcnow()
    since = now - BUSY_WINDOW
    workers = session.execute(
        select(Worker)
        .where(Worker.stopped_at.is_(None), Worker.heartbeat_at >= now - SHOWN_FOR)
        .order_by(Worker.pool, Worker.id)
    ).scalars()
    running = session.execute(
        select(Job.id, Job.worker_id, Job.model, Job.progress, Job.tenant, Job.started_at).where(
            Job.status == JobStatus.RUNNING
        )
    ).all()
    finished = session.execute(
        select(Job.worker_id, Job.started_at, Job.finished_at).where(
            Job.finished_at >= since, Job.worker_id.is_not(None)
        )
    ).all()
    workers = list(workers)
    children = [w for worker in workers for w in (worker.stats or {}).get("job_workers", [])]
    models = registry.loaded_models(session, children)
    by_job_worker: dict[str, list[Any]] = {}
    for row in running:
        by_job_worker.setdefault(row.worker_id or "", []).append(("running", row))
    for row in finished:
        by_job_worker.setdefault(row.worker_id or "", []).append(("finished", row))
    shown = []
    for worker in workers:
        stats = worker.stats or {}
        mine = [item for w in stats.get("job_workers", []) for item in by_job_worker.get(w, [])]
        current = [row for kind, row in mine if kind == "running"]
        if tenant is not None and not any(row.tenant == tenant for row in current):
            continue
        busy = sum(_overlap(row.started_at, now, since) for row in current)
        busy += sum(
            _overlap(row.started_at, row.finished_at, since)
            for kind, row in mine
            if kind == "finished"
        )
        processes = max(1, len(stats.get("job_workers", [])))
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
                jobs_done=sum(1 for kind, _ in mine if kind == "finished"),
                busy_fraction_10m=round(
                    min(1.0, busy / (BUSY_WINDOW.total_seconds() * processes)), 4
                ),
                heartbeat_at=unix(worker.heartbeat_at) or 0,
                stale=worker.heartbeat_at < now - timedelta(seconds=settings.worker_timeout_s),
                loaded_models=sorted(
                    {m for w in stats.get("job_workers", []) for m in models.get(w, [])}
                ),
            )
        )
    return shown
