"""Prometheus metrics of the API: request counts and latencies (a middleware), and, read at
scrape time from the roll-ups and the workers' beats, the service's own series: jobs by
state, outcomes by model and error code, latency histograms, uploads, workers and GPUs.

Each app has its own registry, so several apps in one process (tests) do not collide.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fvb_core.db import outbox, rollup
from fvb_core.db.models import WebhookEvent
from fvb_core.db.session import session_scope
from fvb_core.jobs import JobStatus
from scheduler.api import fleet_view
from scheduler.api.context import ApiContext

log = logging.getLogger(__name__)


class JobsCollector(Collector):
    """The service's series, read when scraped from the roll-ups (``fvb_core/db/rollup.py``)
    and the workers' beats: the database is the truth, and a scrape costs the same at 10
    or 1,000,000 jobs. Workers push what they know through their heartbeat
    (``worker/telemetry.py``), so Prometheus scrapes the API alone."""

    def __init__(self, context: ApiContext) -> None:
        self.context = context

    def collect(self) -> Iterable[Any]:
        try:
            with session_scope(self.context.settings.database_url) as session:
                rollup.snapshot(session)
                pending = rollup.pending(session)
                counts = rollup.job_counts(session)
                outcomes = rollup.outcomes(session, pending)
                latency = rollup.latency(session, pending)
                lag = rollup.pending_count(session)
                workers = fleet_view.fleet(session, self.context.settings, None)
                delivered = outbox.delivery_counts(session)
                webhooks = session.execute(
                    select(func.count())
                    .select_from(WebhookEvent)
                    .where(WebhookEvent.delivered_at.is_(None), WebhookEvent.given_up_at.is_(None))
                ).scalar_one()
        except Exception as err:  # a scrape must not fail because the DB is down
            log.warning("metrics: database unavailable: %s", err)
            return
        yield from self._jobs(counts)
        yield from self._outcomes(outcomes)
        yield from self._latency(latency)
        yield from self._workers(workers)
        pending_events = GaugeMetricFamily(
            "fvb_rollup_pending_events", "Job events not folded into the roll-ups yet"
        )
        pending_events.add_metric([], lag)
        yield pending_events
        due = GaugeMetricFamily("fvb_webhook_events_pending", "Webhook events not delivered yet")
        due.add_metric([], webhooks)
        yield due
        deliveries = CounterMetricFamily(
            "fvb_webhook_deliveries",
            "Webhook delivery attempts by outcome (delivered, failed; given_up: events dropped)",
            labels=["outcome"],
        )
        for outcome in ("delivered", "failed", "given_up"):
            deliveries.add_metric([outcome], delivered.get(outcome, 0))
        yield deliveries

    def _jobs(self, counts: Tally) -> Iterable[Any]:
        jobs = GaugeMetricFamily(
            "fvb_jobs", "Jobs by status (deleted ones excluded)", labels=["status"]
        )
        by_model = GaugeMetricFamily(
            "fvb_jobs_by_model",
            "Jobs by model and API state (queued, in_progress, completed, failed, cancelled)",
            labels=["model", "state"],
        )
        depth = GaugeMetricFamily("fvb_queue_depth", "Queued jobs per GPU pool", labels=["pool"])
        totals: Tally = Tally()
        states: Tally = Tally()
        pools = {model.pool: 0 for model in self.context.models.values()}
        for (_tenant, model, status), n in counts.items():
            totals[status] += n
            states[(model, STATE_NAMES.get(status, status))] += n
            if status == JobStatus.QUEUED:
                served = self.context.models.get(model)
                pool = served.pool if served else "unknown"
                pools[pool] = pools.get(pool, 0) + n
        for status in JobStatus:
            jobs.add_metric([status.value], totals.get(status.value, 0))
        for (model, state), n in sorted(states.items()):
            by_model.add_metric([model, state], n)
        for pool, n in sorted(pools.items()):
            depth.add_metric([pool], n)
        yield from (jobs, by_model, depth)

    def _outcomes(self, outcomes: dict[str, Tally]) -> Iterable[Any]:
        families = {
            name: CounterMetricFamily(f"fvb_jobs_{name}", help_, labels=labels)
            for name, help_, labels in (
                ("completed", "Jobs that succeeded", ["model"]),
                ("failed", "Jobs that failed, by error code", ["model", "error_code"]),
                ("cancelled", "Jobs cancelled", ["model"]),
                ("retried", "Failed or cancelled jobs queued again on request", ["model"]),
                (
                    "requeued",
                    "Attempts put back in the queue (worker lost, retry later)",
                    ["model"],
                ),
            )
        }
        uploaded = CounterMetricFamily(
            "fvb_upload_bytes", "Bytes of the videos stored", labels=["model"]
        )
        sums: Tally = Tally()
        size: Tally = Tally()
        for (_tenant, model, outcome, code), n in outcomes["n"].items():
            if outcome in families:
                sums[(outcome, model, code)] += n
            if outcome == "completed":
                size[model] += outcomes["output_bytes"].get((_tenant, model, outcome, code), 0)
        for (outcome, model, code), n in sorted(sums.items()):
            labels = [model, code] if outcome == "failed" else [model]
            families[outcome].add_metric(labels, n)
        for model, n in sorted(size.items()):
            uploaded.add_metric([model], n)
        yield from families.values()
        yield uploaded

    def _latency(self, latency: dict) -> Iterable[Any]:
        for metric, help_ in (
            ("queue_wait", "Created to started, of jobs that succeeded"),
            ("render", "Started to finished, of jobs that succeeded"),
        ):
            family = HistogramMetricFamily(f"fvb_job_{metric}_seconds", help_, labels=["model"])
            for (model, name), (buckets, _n, total) in sorted(latency.items()):
                if name != metric:
                    continue
                cumulative, running = [], 0
                for bound, count in zip(rollup.LATENCY_BUCKETS, buckets, strict=True):
                    running += count
                    cumulative.append((floatToGoString(bound), running))
                family.add_metric([model], cumulative, sum_value=total)
            yield family

    def _workers(self, workers: list) -> Iterable[Any]:
        up = GaugeMetricFamily(
            "fvb_worker_up", "1 while the worker beats in time, 0 when stale",
            labels=["worker", "pool", "host"],
        )  # fmt: skip
        busy = GaugeMetricFamily(
            "fvb_worker_busy_ratio", "Part of the last 10 minutes spent rendering",
            labels=["worker"],
        )  # fmt: skip
        gpu_labels = ["worker", "gpu", "name"]
        used = GaugeMetricFamily(
            "fvb_gpu_memory_used_bytes", "GPU memory in use", labels=gpu_labels
        )
        total = GaugeMetricFamily("fvb_gpu_memory_total_bytes", "GPU memory", labels=gpu_labels)
        util = GaugeMetricFamily("fvb_gpu_utilization_ratio", "GPU busy (NVML)", labels=gpu_labels)
        temp = GaugeMetricFamily(
            "fvb_gpu_temperature_celsius", "GPU temperature", labels=gpu_labels
        )
        for worker in workers:
            up.add_metric([worker.worker_id, worker.pool, worker.host], 0 if worker.stale else 1)
            busy.add_metric([worker.worker_id], worker.busy_fraction_10m)
            for gpu in worker.gpus:
                labels = [worker.worker_id, str(gpu.index), gpu.name]
                used.add_metric(labels, gpu.memory_used_mib * 2**20)
                total.add_metric(labels, gpu.memory_total_mib * 2**20)
                util.add_metric(labels, gpu.utilization_pct / 100)
                temp.add_metric(labels, gpu.temperature_c)
        yield from (up, busy, used, total, util, temp)


#: Job statuses under the API's names (cancelled kept apart from failed).
STATE_NAMES = {
    JobStatus.QUEUED.value: "queued",
    JobStatus.RUNNING.value: "in_progress",
    JobStatus.SUCCEEDED.value: "completed",
    JobStatus.FAILED.value: "failed",
    JobStatus.CANCELLED.value: "cancelled",
}


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
