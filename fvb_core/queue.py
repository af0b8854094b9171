"""The queue: Celery configuration shared by the scheduler (publishes) and the workers
(consume), publishing, and a look at what a pool's queue holds right now.

Redis only carries "please run job X": the job row is the truth, so these settings aim at
never losing a message and tolerating duplicates (the attempt fence makes them harmless).
The scheduler keeps only a few messages per live consumer in a queue; :func:`queued_job_ids`
is how it knows which are there (waiting, or taken by a worker and not yet acknowledged).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable
from functools import lru_cache

from celery import Celery

from fvb_core.settings import Settings

log = logging.getLogger(__name__)

RENDER_TASK = "fvb.render"
#: Redis priority levels: 0 is served first, 9 last (kombu's ``priority_steps`` below).
LOWEST_LEVEL = 9
#: kombu's separator between a queue's name and its priority level in the Redis key.
_PRIORITY_SEP = "\x06\x16"
#: Past this many messages in one queue the scheduler stops reading ids: far above any bound.
MAX_INSPECTED = 10_000


def queue_for_pool(pool: str) -> str:
    return f"gpu.{pool}"


def make_celery(settings: Settings, name: str = "fvb") -> Celery:
    app = Celery(name, broker=settings.broker_url)
    app.conf.update(
        # Acknowledge after the task ran, and put the message back if the process running
        # it dies: a job is never silently dropped by a crash.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A task that raised (a render that failed for good) is acknowledged, not redelivered.
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # A broker that accepts connections but never answers must not hang a request
            # or the reaper forever; 10 s stays above kombu's 1 s BRPOP poll.
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            # Ten priority levels (kombu's Redis default is four: 0, 3, 6, 9), one per
            # priority_level value. Consumers read them in this order.
            "priority_steps": list(range(10)),
        },
        broker_connection_retry_on_startup=True,
        task_default_queue=queue_for_pool(settings.worker_pool),
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Task events (received, started, succeeded, failed with the error code; sent by the
        # dispatcher) for Flower and `celery events`: small messages on the broker's celeryev
        # fanout, dropped when nobody listens.
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    return app


def priority_level(priority: int) -> int:
    """API priority (-10 lowest .. 10 highest) -> the Redis level, 0 served first. Fair share
    is decided when the scheduler releases a job, not here: the level only keeps an
    interactive job that was released after a bulk one ahead of it in the queue."""
    clamped = max(-10, min(10, priority))
    return round((10 - clamped) * LOWEST_LEVEL / 20)


@lru_cache(maxsize=4)
def publisher(settings: Settings) -> Celery:
    """The Celery app this process publishes with (made once per settings)."""
    return make_celery(settings, name="fvb-scheduler")


def publish(settings: Settings, job_id: str, pool: str, priority: int = 0) -> None:
    """Put "run job X" on the pool's queue."""
    publish_many(settings, [(job_id, pool, priority)])


def publish_many(settings: Settings, messages: Iterable[tuple[str, str, int]]) -> list[str]:
    """Publish (job id, pool, priority) messages over one broker connection; the ids sent,
    in order. Raises on the first failure (the ones before it were sent)."""
    app = publisher(settings)
    sent: list[str] = []
    with app.producer_or_acquire() as producer:
        for job_id, pool, priority in messages:
            app.send_task(
                RENDER_TASK,
                args=[job_id],
                queue=queue_for_pool(pool),
                priority=priority_level(priority),
                producer=producer,
            )
            sent.append(job_id)
    return sent


def _job_id_of(raw: bytes | str) -> str | None:
    """The job id in a kombu message (protocol 2: the body is [args, kwargs, embed])."""
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # an unacked entry: [message, exchange, routing key]
            message = message[0]
        if message.get("headers", {}).get("task") != RENDER_TASK:
            return None
        args = json.loads(base64.b64decode(message["body"]))[0]
        return str(args[0]) if args else None
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def queued_job_ids(redis_client, pool: str) -> set[str] | None:
    """Ids of the jobs whose message is in the pool's queue now: waiting in one of its
    priority lists, or delivered to a worker and not acknowledged yet. None when the queue
    holds more than :data:`MAX_INSPECTED` (the scheduler then releases nothing there)."""
    queue = queue_for_pool(pool)
    keys = [queue, *(f"{queue}{_PRIORITY_SEP}{level}" for level in range(1, LOWEST_LEVEL + 1))]
    with redis_client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.llen(key)
        lengths = pipe.execute()
    if sum(lengths) > MAX_INSPECTED:
        return None
    ids: set[str] = set()
    with redis_client.pipeline(transaction=False) as pipe:
        for key, length in zip(keys, lengths, strict=True):
            if length:
                pipe.lrange(key, 0, -1)
        for raws in pipe.execute():
            ids.update(i for i in map(_job_id_of, raws) if i)
    # kombu keeps delivered, unacknowledged messages in one hash for all queues.
    for raw in redis_client.hvals("unacked"):
        try:
            routing = json.loads(raw)[2]
        except (ValueError, IndexError, TypeError):
            continue
        if routing == queue:
            job_id = _job_id_of(raw)
            if job_id:
                ids.add(job_id)
    return ids
