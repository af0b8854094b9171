"""The worker's Celery app: the shared configuration, the render task, one queue.

``create_app(settings)`` is what :mod:`worker.main` runs. ``worker.celery_app:app`` (built
from the environment on first access) is there for the ``celery`` command line, e.g.
``celery -A worker.celery_app inspect active``.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from fvb_core.queue import make_celery, queue_for_pool
from fvb_core.settings import Settings, get_settings
from worker.tasks import register_tasks


def create_app(settings: Settings) -> Celery:
    app = make_celery(settings, name="fvb-worker")
    queue = queue_for_pool(settings.worker_pool)
    # The same queue (and direct exchange) Celery declares when dispatch sends to it by name;
    # this worker consumes that queue and no other.
    app.conf.task_queues = (Queue(queue, Exchange(queue), routing_key=queue),)
    register_tasks(app, settings)
    return app


def __getattr__(name: str) -> Celery:
    if name == "app":
        global app
        app = create_app(get_settings())
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
