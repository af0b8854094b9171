"""Send "run job X" to the Celery queue of the job's GPU pool, and record that we did.

Order in the queue: the job's priority, then fair share between tenants. Redis serves a
queue's messages by priority level (ten levels: ``celery_config`` sets kombu's
``priority_steps``), first in first out within a level. A tenant's jobs drop one level for
every ``fair_share_step`` of its own queued jobs created before them, by at most
``fair_share_levels``: one tenant's thousand-video batch cannot hold another tenant's
first videos (of the same priority) behind all of it, they wait for at most
``fair_share_step`` of its jobs per level.
"""

from __future__ import annotations

from functools import lru_cache

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fvb_core.db import transitions
from fvb_core.db.models import Job
from fvb_core.db.session import session_scope
from fvb_core.jobs import JobStatus
from fvb_core.queue import RENDER_TASK, make_celery, queue_for_pool
from fvb_core.settings import Settings

#: Redis priority levels: 0 is served first, 9 last.
LOWEST_LEVEL = 9


@lru_cache(maxsize=4)
def _celery(settings: Settings):
    return make_celery(settings, name="fvb-dispatch")


def redis_priority(priority: int, backlog: int = 0, step: int = 0, levels: int = 0) -> int:
    """API priority (-10 lowest .. 10 highest) -> kombu's Redis priority level, 0 served
    first and 9 last; then ``backlog // step`` levels lower (at most ``levels``, never past
    9) for a tenant with ``backlog`` queued jobs ahead of this one (fair share; ``step`` or
    ``levels`` 0: off)."""
    clamped = max(-10, min(10, priority))
    level = round((10 - clamped) * LOWEST_LEVEL / 20)
    if step > 0 and levels > 0:
        level += min(backlog // step, levels)
    return min(level, LOWEST_LEVEL)


def queued_ahead(session: Session, job_id: str) -> int:
    """The job's tenant's queued jobs created before it (0 for an unknown job)."""
    job = session.get(Job, job_id)
    if job is None:
        return 0
    return session.execute(
        select(func.count())
        .select_from(Job)
        .where(
            Job.tenant == job.tenant,
            Job.status == JobStatus.QUEUED,
            Job.created_at < job.created_at,
        )
    ).scalar_one()


def dispatch(settings: Settings, job_id: str, pool: str, priority: int = 0) -> None:
    """Publish the job's message, then stamp ``dispatched_at`` (the reaper re-sends a queued
    job whose stamp is missing or old, so a publish lost between the two is recovered)."""
    with session_scope(settings.database_url) as session:
        backlog = queued_ahead(session, job_id)
    level = redis_priority(priority, backlog, settings.fair_share_step, settings.fair_share_levels)
    _celery(settings).send_task(
        RENDER_TASK, args=[job_id], queue=queue_for_pool(pool), priority=level
    )
    with session_scope(settings.database_url) as session:
        transitions.mark_dispatched(session, job_id)
