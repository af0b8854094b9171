"""The job trail folded into small tables: what the console and ``/metrics`` read instead of
counting the jobs table (whose size they must not feel: 10 or 1,000,000 rows cost the same).

Every state change writes a ``job_events`` row (``fvb_core/db/transitions.py``: creation is
``None -> queued``, a deletion ``status -> status`` with detail ``deleted``). The scheduler
folds the events nobody folded yet (:func:`fold`, found by the partial index
``ix_job_events_pending``) into

- ``job_counts``: jobs by (tenant, model, status), deleted ones left out;
- ``job_outcomes``: completed / failed (by error code) / cancelled / retried / requeued /
  deleted per (tenant, model), and the bytes of the stored videos;
- ``job_latency``: histograms of queue wait and render time of succeeded jobs per model;
- ``job_minutes``: per minute and (tenant, model), jobs completed and failed and the
  completed ones' histograms (the console's throughput and charts);

and samples queue depth per pool once a minute (:func:`sample_queues`). A reader adds the
events not folded yet (:func:`pending`), in one snapshot with the tables
(:func:`snapshot`), so what it shows is exact even between two folds, or with no scheduler
running; only their number (bounded by how often the scheduler folds) is on its path.

One folder at a time: on PostgreSQL a transaction-level advisory lock serialises
:func:`fold` (the upserts then never wait on each other); SQLite has one writer anyway.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from fvb_core.db.models import (
    Job,
    JobCount,
    JobEvent,
    JobLatency,
    JobMinute,
    JobOutcome,
    QueueSample,
)
from fvb_core.jobs import JobStatus

#: Upper bounds (seconds) of the latency histograms' buckets; the last one catches the rest.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, math.inf,
)  # fmt: skip
QUEUE_WAIT, RENDER = "queue_wait", "render"
COMPLETED, FAILED, CANCELLED = "completed", "failed", "cancelled"
RETRIED, REQUEUED, DELETED = "retried", "requeued", "deleted"

#: Events folded per statement batch, and the most a reader adds on its own.
FOLD_LIMIT = 5000
PENDING_LIMIT = 20_000
_CHUNK = 500


@dataclass
class Deltas:
    """What a run of events changes in the roll-ups."""

    counts: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    outcomes: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)
    output_bytes: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)
    #: (model, metric) -> (bucket counts, n, total seconds)
    latency: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    #: (minute, tenant, model) -> Minute
    minutes: dict[tuple[datetime, str, str], Minute] = field(default_factory=dict)
    event_ids: list[int] = field(default_factory=list)

    def minute(self, at: datetime, tenant: str, model: str) -> Minute:
        key = (at.replace(second=0, microsecond=0), tenant, model)
        return self.minutes.setdefault(key, Minute())

    def observe(self, model: str, metric: str, seconds: float) -> None:
        buckets, n, total = self.latency.setdefault(
            (model, metric), [[0] * len(LATENCY_BUCKETS), 0, 0.0]
        )
        buckets[bucket_of(seconds)] += 1
        self.latency[(model, metric)] = [buckets, n + 1, total + seconds]


def _empty() -> list[int]:
    return [0] * len(LATENCY_BUCKETS)


@dataclass
class Minute:
    """One minute of one (tenant, model): what finished in it."""

    completed: int = 0
    failed: int = 0
    queue_wait: list[int] = field(default_factory=_empty)
    render: list[int] = field(default_factory=_empty)

    def add(self, other: Minute) -> None:
        self.completed += other.completed
        self.failed += other.failed
        self.queue_wait = [a + b for a, b in zip(self.queue_wait, other.queue_wait, strict=True)]
        self.render = [a + b for a, b in zip(self.render, other.render, strict=True)]


def percentile_of(buckets: list[int], q: float) -> float | None:
    """The ``q`` quantile estimated from bucket counts (linear within the bucket, as
    Prometheus' histogram_quantile; the open last bucket answers its lower bound)."""
    total = sum(buckets)
    if total == 0:
        return None
    rank, seen = q * total, 0
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            low = LATENCY_BUCKETS[i - 1] if i else 0.0
            high = LATENCY_BUCKETS[i]
            if math.isinf(high):
                return low
            return low + (high - low) * (rank - seen) / count
        seen += count
    return LATENCY_BUCKETS[-2]


def bucket_of(seconds: float) -> int:
    return next(i for i, bound in enumerate(LATENCY_BUCKETS) if seconds <= bound)


_COLUMNS = (
    JobEvent.id,
    JobEvent.at,
    JobEvent.from_status,
    JobEvent.to_status,
    JobEvent.detail,
    Job.tenant,
    Job.model,
    Job.error_code,
    Job.output_bytes,
    Job.created_at,
    Job.started_at,
    Job.finished_at,
)


def _pending_rows(session: Session, limit: int, tenant: str | None = None) -> Sequence[Any]:
    query = (
        select(*_COLUMNS)
        .join(Job, Job.id == JobEvent.job_id)
        .where(~JobEvent.rolled_up)  # the partial index's own predicate
        .order_by(JobEvent.id)
        .limit(limit)
    )
    if tenant is not None:
        query = query.where(Job.tenant == tenant)
    return session.execute(query).all()


def deltas_of(rows: Iterable[Any]) -> Deltas:
    """Fold event rows (with their job's tenant, model and outcome) into deltas."""
    d = Deltas()
    for r in rows:
        d.event_ids.append(r.id)
        key = (r.tenant, r.model)
        if r.detail == DELETED:
            d.counts[(*key, r.from_status)] -= 1
            d.outcomes[(*key, DELETED, "")] += 1
            continue
        if r.from_status == r.to_status:
            continue  # expired, or another mark that is not a state change
        if r.from_status is not None:
            d.counts[(*key, r.from_status)] -= 1
        d.counts[(*key, r.to_status)] += 1
        if r.to_status == JobStatus.SUCCEEDED:
            d.outcomes[(*key, COMPLETED, "")] += 1
            d.output_bytes[(*key, COMPLETED, "")] += r.output_bytes or 0
            minute = d.minute(r.finished_at or r.at, *key)
            minute.completed += 1
            if r.started_at is not None and r.finished_at is not None:
                wait = _seconds(r.created_at, r.started_at)
                render = _seconds(r.started_at, r.finished_at)
                d.observe(r.model, QUEUE_WAIT, wait)
                d.observe(r.model, RENDER, render)
                minute.queue_wait[bucket_of(wait)] += 1
                minute.render[bucket_of(render)] += 1
        elif r.to_status == JobStatus.FAILED:
            # The event's detail is the code it failed with (the row's may have moved on).
            d.outcomes[(*key, FAILED, r.detail or r.error_code or "failed")] += 1
            d.minute(r.at, *key).failed += 1
        elif r.to_status == JobStatus.CANCELLED:
            d.outcomes[(*key, CANCELLED, "")] += 1
        elif r.to_status == JobStatus.QUEUED:
            if r.detail == "retry":
                d.outcomes[(*key, RETRIED, "")] += 1
            elif r.from_status == JobStatus.RUNNING:
                d.outcomes[(*key, REQUEUED, "")] += 1
    return d


def _seconds(start: datetime, end: datetime) -> float:
    return max(0.0, (end - start).total_seconds())


# -- writing (the scheduler) -------------------------------------------------------------------


def _upsert(session: Session):
    return {"sqlite": sqlite.insert, "postgresql": postgresql.insert}[
        session.get_bind().dialect.name
    ]


def _lock(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        key = int.from_bytes(hashlib.blake2b(b"fvb.rollup", digest_size=8).digest(), "big")
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key - (1 << 63)})


OUTCOME_KEY = [JobOutcome.tenant, JobOutcome.model, JobOutcome.outcome, JobOutcome.error_code]


def apply(session: Session, d: Deltas) -> None:
    """Add ``d`` to the roll-up tables (keys in sorted order)."""
    insert = _upsert(session)
    for (tenant, model, status), n in sorted(d.counts.items()):
        if n:
            statement = insert(JobCount).values(tenant=tenant, model=model, status=status, n=n)
            session.execute(
                statement.on_conflict_do_update(
                    index_elements=[JobCount.tenant, JobCount.model, JobCount.status],
                    set_={"n": JobCount.n + statement.excluded.n},
                )
            )
    for key, n in sorted(d.outcomes.items()):
        tenant, model, outcome, code = key
        statement = insert(JobOutcome).values(
            tenant=tenant,
            model=model,
            outcome=outcome,
            error_code=code,
            n=n,
            output_bytes=d.output_bytes.get(key, 0),
        )
        session.execute(
            statement.on_conflict_do_update(
                index_elements=OUTCOME_KEY,
                set_={
                    "n": JobOutcome.n + statement.excluded.n,
                    "output_bytes": JobOutcome.output_bytes + statement.excluded.output_bytes,
                },
            )
        )
    for (model, metric), (buckets, n, total) in sorted(d.latency.items()):
        row = session.get(JobLatency, (model, metric))
        if row is None:
            session.add(JobLatency(model=model, metric=metric, buckets=buckets, n=n, total_s=total))
        else:
            row.buckets = [a + b for a, b in zip(row.buckets, buckets, strict=True)]
            row.n += n
            row.total_s += total
    for (at, tenant, model), minute in sorted(d.minutes.items()):
        row = session.get(JobMinute, (at, tenant, model))
        if row is None:
            session.add(
                JobMinute(
                    minute=at,
                    tenant=tenant,
                    model=model,
                    completed=minute.completed,
                    failed=minute.failed,
                    queue_wait=minute.queue_wait,
                    render=minute.render,
                )
            )
        else:
            have = Minute(row.completed, row.failed, list(row.queue_wait), list(row.render))
            have.add(minute)
            row.completed, row.failed = have.completed, have.failed
            row.queue_wait, row.render = have.queue_wait, have.render
    session.flush()


def fold(session: Session, limit: int = FOLD_LIMIT) -> int:
    """Fold up to ``limit`` pending events into the roll-ups and mark them; how many."""
    _lock(session)
    rows = _pending_rows(session, limit)
    if not rows:
        return 0
    d = deltas_of(rows)
    apply(session, d)
    for start in range(0, len(d.event_ids), _CHUNK):
        chunk = d.event_ids[start : start + _CHUNK]
        session.execute(update(JobEvent).where(JobEvent.id.in_(chunk)).values(rolled_up=True))
    return len(rows)


def sample_queues(session: Session, pool_of: Mapping[str, str], minute: datetime) -> None:
    """Queued and running jobs per pool (``pool_of``: model -> pool) at ``minute``."""
    by_pool: dict[str, list[int]] = {pool: [0, 0] for pool in pool_of.values()}
    for (_tenant, model, status), n in job_counts(session).items():
        if status in (JobStatus.QUEUED, JobStatus.RUNNING):
            pool = by_pool.setdefault(pool_of.get(model, "unknown"), [0, 0])
            pool[0 if status == JobStatus.QUEUED else 1] += n
    insert = _upsert(session)
    for pool, (queued, running) in sorted(by_pool.items()):
        statement = insert(QueueSample).values(
            minute=minute, pool=pool, queued=queued, running=running
        )
        session.execute(
            statement.on_conflict_do_update(
                index_elements=[QueueSample.minute, QueueSample.pool],
                set_={"queued": queued, "running": running},
            )
        )


# -- reading (the API) ------------------------------------------------------------------------


def snapshot(session: Session) -> None:
    """Make the next reads one snapshot (PostgreSQL: a REPEATABLE READ transaction), so the
    tables and the pending events never count one event twice or not at all. Ends the
    session's transaction so far (a request's session has read its key already)."""
    session.commit()
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))


def pending(session: Session, tenant: str | None = None) -> Deltas:
    """The deltas of the events not folded yet (the tenant's only, when given)."""
    return deltas_of(_pending_rows(session, PENDING_LIMIT, tenant))


def job_counts(
    session: Session, tenant: str | None = None, pending_deltas: Deltas | None = None
) -> Counter[tuple[str, str, str]]:
    """(tenant, model, status) -> jobs, exact: the folded counts plus the pending events
    (``pending_deltas``: already read, every tenant's)."""
    query = select(JobCount.tenant, JobCount.model, JobCount.status, JobCount.n)
    if tenant is not None:
        query = query.where(JobCount.tenant == tenant)
    counts: Counter[tuple[str, str, str]] = Counter()
    for t, model, status, n in session.execute(query).all():
        counts[(t, model, status)] += n
    d = pending_deltas if pending_deltas is not None else pending(session, tenant)
    counts.update({k: n for k, n in d.counts.items() if tenant is None or k[0] == tenant})
    return +counts  # zero rows left out


def minutes(
    session: Session, since: datetime, tenant: str | None, pending_deltas: Deltas
) -> dict[datetime, Minute]:
    """Minute -> what finished in it from ``since`` on (the tenant's, or everyone's)."""
    query = select(JobMinute).where(JobMinute.minute >= since)
    if tenant is not None:
        query = query.where(JobMinute.tenant == tenant)
    result: dict[datetime, Minute] = {}
    for row in session.execute(query).scalars():
        have = result.setdefault(row.minute, Minute())
        have.add(Minute(row.completed, row.failed, list(row.queue_wait), list(row.render)))
    for (at, owner, _model), minute in pending_deltas.minutes.items():
        if at >= since and (tenant is None or owner == tenant):
            result.setdefault(at, Minute()).add(minute)
    return result


def outcomes(session: Session, pending_deltas: Deltas | None = None) -> dict[str, Counter]:
    """Every tenant's outcome counters: {"n": (tenant, model, outcome, code) -> count,
    "output_bytes": the same keys -> bytes}."""
    n: Counter = Counter()
    size: Counter = Counter()
    for row in session.execute(select(JobOutcome)).scalars():
        key = (row.tenant, row.model, row.outcome, row.error_code)
        n[key] += row.n
        size[key] += row.output_bytes
    d = pending_deltas if pending_deltas is not None else pending(session)
    n.update(d.outcomes)
    size.update(d.output_bytes)
    return {"n": n, "output_bytes": size}


def latency(session: Session, pending_deltas: Deltas | None = None) -> dict[tuple[str, str], list]:
    """(model, metric) -> [bucket counts, n, total seconds], pending events included."""
    result = {
        (row.model, row.metric): [list(row.buckets), row.n, row.total_s]
        for row in session.execute(select(JobLatency)).scalars()
    }
    d = pending_deltas if pending_deltas is not None else pending(session)
    for key, (buckets, n, total) in d.latency.items():
        have = result.setdefault(key, [[0] * len(LATENCY_BUCKETS), 0, 0.0])
        result[key] = [[a + b for a, b in zip(have[0], buckets, strict=True)], have[1] + n,
                       have[2] + total]  # fmt: skip
    return result


def queue_samples(session: Session, since: datetime) -> list[QueueSample]:
    return list(
        session.execute(
            select(QueueSample).where(QueueSample.minute >= since).order_by(QueueSample.minute)
        ).scalars()
    )


def prune_samples(session: Session, before: datetime) -> None:
    """Queue samples and minute roll-ups older than ``before`` go (the outcome counters and
    histograms keep everything)."""
    session.execute(QueueSample.__table__.delete().where(QueueSample.minute < before))
    session.execute(JobMinute.__table__.delete().where(JobMinute.minute < before))


def pending_count(session: Session) -> int:
    """Events waiting to be folded (the scheduler's lag)."""
    return session.execute(
        select(func.count()).select_from(JobEvent).where(~JobEvent.rolled_up)
    ).scalar_one()
