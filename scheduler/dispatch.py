"""Send "run job X" to the Celery queue of the job's GPU pool, and record that we did."""

from __future__ import annotations

from functools import lru_cache

from scheduler.celery_config import RENDER_TASK, make_celery, queue_for_pool
from scheduler.db import transitions
from scheduler.db.session import session_scope
from scheduler.settings import Settings


@lru_cache(maxsize=4)
def _celery(settings: Settings):
    return make_celery(settings, name="fvb-dispatch")


def redis_priority(priority: int) -> int:
    """API priority (-10 lowest .. 10 highest) -> kombu's Redis priority, where 0 is served
    first and 9 last."""
    clamped = max(-10, min(10, priority))
    return round((10 - clamped) * 9 / 20)


def dispatch(settings: Settings, job_id: str, pool: str, priority: int = 0) -> None:
    """Publish the job's message, then stamp ``dispatched_at`` (the reaper re-sends a queued
    job whose stamp is missing or old, so a publish lost between the two is recovered)."""
    _celery(settings).send_task(
        RENDER_TASK,
        args=[job_id],
        queue=queue_for_pool(pool),
        priority=redis_priority(priority),
    )
    with session_scope(settings.database_url) as session:
        transitions.mark_dispatched(session, job_id)
