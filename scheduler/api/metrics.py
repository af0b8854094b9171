"""Prometheus metrics of the API: request counts and latencies (a middleware), and, read at
scrape time, jobs by status and queued jobs per GPU pool.

Each app has its own registry, so several apps in one process (tests) do not collide.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fvb_core.db.models import Job
from fvb_core.db.session import session_scope
from fvb_core.jobs import JobStatus
from scheduler.api.context import ApiContext

log = logging.getLogger(__name__)


class JobsCollector(Collector):
    """Counts from the database when scraped: the job row is the truth, not a counter."""

    def __init__(self, context: ApiContext) -> None:
        self.context = context

    def collect(self) -> Iterable[GaugeMetricFamily]:
        jobs = GaugeMetricFamily(
            "fvb_jobs", "Jobs by status (deleted ones excluded)", labels=["status"]
        )
        depth = GaugeMetricFamily("fvb_queue_depth", "Queued jobs per GPU pool", labels=["pool"])
        try:
            with session_scope(self.context.settings.database_url) as session:
                by_status = dict(
                    session.execute(
                        select(Job.status, func.count())
                        .where(Job.deleted_at.is_(None))
                        .group_by(Job.status)
                    ).all()
                )
                by_model = session.execute(
                    select(Job.model, func.count())
                    .where(Job.status == JobStatus.QUEUED)
                    .group_by(Job.model)
                ).all()
        except Exception as err:  # a scrape must not fail because the DB is down
            log.warning("metrics: database unavailable: %s", err)
            return
        for status in JobStatus:
            jobs.add_metric([status.value], by_status.get(status.value, 0))
        pools = {model.pool: 0 for model in self.context.models.values()}
        for model_name, count in by_model:
            served = self.context.models.get(model_name)
            pool = served.pool if served else "unknown"
            pools[pool] = pools.get(pool, 0) + count
        for pool, count in sorted(pools.items()):
            depth.add_metric([pool], count)
        yield jobs
        yield depth


class Metrics:
    def __init__(self, context: ApiContext) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fvb_http_requests",
            "HTTP requests by method, route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fvb_http_request_duration_seconds",
            "HTTP request latency by method and route",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.registry.register(JobsCollector(context))


class MetricsMiddleware:
    """Counts every HTTP request under its route template (``/v1/videos/{video_id}``), so
    ids do not explode the label space."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - started)
