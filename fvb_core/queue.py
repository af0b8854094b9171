"""Celery configuration shared by the dispatcher (sends) and the workers (consume).

Redis only carries "please run job X": the job row is the truth, so these settings aim at
never losing a message and tolerating duplicates (the attempt fence makes them harmless).
"""

from __future__ import annotations

from celery import Celery

from fvb_core.settings import Settings

RENDER_TASK = "fvb.render"


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
            # scheduler.dispatch.redis_priority value. Consumers read them in this order.
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
