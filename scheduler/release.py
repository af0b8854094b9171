"""Release: the database is the queue; Redis holds only a few messages per live consumer.

The API only inserts a job (queued, ``dispatched_at`` NULL). A release pass, run by the one
scheduler process that holds the ``release`` lease, does per GPU pool:

1. Reads which jobs the pool's queue holds now (waiting, or taken and not acknowledged:
   :func:`fvb_core.queue.queued_job_ids`). A job the database calls released whose message
   is in neither place for longer than ``release_grace_s`` lost it (the broker was wiped or
   restarted empty, a publish failed half-way): it waits again and is released anew. A job
   whose message is still there is never released twice.
2. Tops the queue up to ``release_per_worker`` messages per live consumer of the pool (the
   workers' registry), choosing at release time, so the order can still change while jobs
   wait: priority first; within a priority, the tenant served the least GPU work lately
   (estimated by :attr:`fvb_core.jobs.JobParams.work`, decaying with a half-life: the
   ``fair_shares`` table) goes next, so a tenant with 100,000 queued videos gets its share,
   not the queue, and a tenant with heavy videos gets fewer of them; then age.
3. Marks the chosen jobs released in one statement (an event each), commits, then
   publishes; whatever could not be published waits again.

Every query follows what it asks for: the waiting jobs of one tenant and priority level come
from a partial index in order (``ix_jobs_ready``), the released ones from another
(``ix_jobs_released``), the tenants from a skip scan over the first; nothing counts the
backlog.
"""

from __future__ import annotations

import heapq
import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import count

import redis
from sqlalchemy import String, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from fvb_core.db import fleet, transitions
from fvb_core.db.models import FairShare, UTCDateTime, utcnow
from fvb_core.db.session import session_scope
from fvb_core.models_config import ServedModel
from fvb_core.queue import publish_many, queue_for_pool, queued_job_ids
from fvb_core.settings import Settings

log = logging.getLogger(__name__)

LEASE = "release"
_READY = "status = 'queued' AND dispatched_at IS NULL"
# A skip scan over ix_jobs_ready: the next tenant after the last, one index probe each
# (status and dispatched_at written out, so the planner sees the partial index's predicate).
_TENANTS = text(
    f"""
    WITH RECURSIVE waiting(tenant) AS (
        SELECT min(tenant) FROM jobs WHERE pool = :pool AND {_READY}
        UNION ALL
        SELECT (SELECT min(tenant) FROM jobs
                WHERE pool = :pool AND {_READY} AND tenant > waiting.tenant)
        FROM waiting WHERE waiting.tenant IS NOT NULL
    )
    SELECT tenant FROM waiting WHERE tenant IS NOT NULL
    """
)
# Released, not yet claimed: ix_jobs_released (its predicate written out, as above; a bound
# status parameter would hide the partial index and scan every queued row).
_RELEASED = text(
    "SELECT id, dispatched_at FROM jobs "
    "WHERE pool = :pool AND status = 'queued' AND dispatched_at IS NOT NULL"
).columns(id=String, dispatched_at=UTCDateTime)
_TOP_PRIORITY = text(
    f"SELECT max(priority) FROM jobs WHERE pool = :pool AND tenant = :tenant AND {_READY}"
)
_NEXT_PRIORITY = text(
    f"SELECT max(priority) FROM jobs WHERE pool = :pool AND tenant = :tenant AND {_READY} "
    "AND priority < :below"
)
_OLDEST = text(
    f"SELECT id, priority, created_at, work FROM jobs "
    f"WHERE pool = :pool AND tenant = :tenant AND {_READY} AND priority = :priority "
    "ORDER BY created_at, id LIMIT :limit"
)


@dataclass
class PoolPass:
    released: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    consumers: int = 0
    in_queue: int = 0


@dataclass
class _Head:
    """A tenant's next waiting jobs, best first."""

    tenant: str
    jobs: list
    priority: int


def _tenant_heads(session: Session, pool: str, tenant: str, want: int) -> list:
    """Up to ``want`` of the tenant's waiting jobs of the pool, priority first, then age."""
    found: list = []
    level = session.execute(_TOP_PRIORITY, {"pool": pool, "tenant": tenant}).scalar()
    while level is not None and len(found) < want:
        found += session.execute(
            _OLDEST,
            {"pool": pool, "tenant": tenant, "priority": level, "limit": want - len(found)},
        ).all()
        level = session.execute(
            _NEXT_PRIORITY, {"pool": pool, "tenant": tenant, "below": level}
        ).scalar()
    return found


def _served(
    session: Session, pool: str, tenants: list[str], half_life_s: float
) -> tuple[dict[str, float], set[str]]:
    """(tenant -> GPU work it was served in the pool, decayed to now; the tenants set level
    with the least served of the others). A tenant new to the pool starts there: it gets its
    share at once, not a burst that would starve the others; its level is recorded, so it
    keeps it while the others are served."""
    now = utcnow()
    rows = session.execute(
        select(FairShare.tenant, FairShare.served, FairShare.updated_at).where(
            FairShare.pool == pool, FairShare.tenant.in_(tenants)
        )
    ).all()
    served = {
        r.tenant: r.served * 0.5 ** ((now - r.updated_at).total_seconds() / half_life_s)
        for r in rows
    }
    floor = min(served.values(), default=0.0)
    levelled = {
        tenant for tenant in tenants if served.get(tenant, floor) < floor or tenant not in served
    }
    return {tenant: max(served.get(tenant, floor), floor) for tenant in tenants}, levelled


def _record_served(session: Session, pool: str, served: dict[str, float]) -> None:
    """Write back what the chosen tenants have now been served (one upsert each)."""
    dialect = session.get_bind().dialect.name
    upsert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}[dialect]
    now = utcnow()
    for tenant in sorted(served):
        session.execute(
            upsert(FairShare)
            .values(pool=pool, tenant=tenant, served=served[tenant], updated_at=now)
            .on_conflict_do_update(
                index_elements=[FairShare.pool, FairShare.tenant],
                set_={"served": served[tenant], "updated_at": now},
            )
        )


def choose(
    session: Session, pool: str, room: int, half_life_s: float = 600.0
) -> list[tuple[str, int]]:
    """The next ``room`` jobs of the pool to release, as (id, priority), in release order:
    priority first; within a priority the tenant served the least GPU work lately; then age.
    Records what each chosen tenant has been served."""
    if room <= 0:
        return []
    tenants = list(session.execute(_TENANTS, {"pool": pool}).scalars())
    if not tenants:
        return []
    served, levelled = _served(session, pool, tenants, half_life_s)
    tie = count()
    heap: list = []
    heads = {}
    for tenant in tenants:
        jobs = _tenant_heads(session, pool, tenant, room)
        if jobs:
            heads[tenant] = jobs
            first = jobs[0]
            key = (-first.priority, served[tenant], first.created_at, next(tie))
            heapq.heappush(heap, (key, tenant, 0))
    chosen: list[tuple[str, int]] = []
    touched = {tenant: served[tenant] for tenant in levelled}
    while heap and len(chosen) < room:
        _key, tenant, index = heapq.heappop(heap)
        job = heads[tenant][index]
        chosen.append((job.id, job.priority))
        served[tenant] += float(job.work or 0.0)
        touched[tenant] = served[tenant]
        if index + 1 < len(heads[tenant]):
            nxt = heads[tenant][index + 1]
            key = (-nxt.priority, served[tenant], nxt.created_at, next(tie))
            heapq.heappush(heap, (key, tenant, index + 1))
    _record_served(session, pool, touched)
    return chosen


class Releaser:
    """One scheduler process's release loop state: who it is, its broker client."""

    def __init__(
        self, settings: Settings, models: dict[str, ServedModel], holder: str | None = None
    ) -> None:
        self.settings = settings
        self.pools = sorted({model.pool for model in models.values()})
        #: The lease holder: one per process unless told otherwise.
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}"
        self._redis: redis.Redis | None = None

    @property
    def broker(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(
                self.settings.broker_url.replace("valkey", "redis", 1),
                socket_timeout=5,
                socket_connect_timeout=5,
            )
        return self._redis

    def is_leader(self) -> bool:
        with session_scope(self.settings.database_url) as session:
            return fleet.hold_lease(session, LEASE, self.holder, self.settings.scheduler_lease_s)

    def step_down(self) -> None:
        with session_scope(self.settings.database_url) as session:
            fleet.release_lease(session, LEASE, self.holder)

    def run_once(self) -> dict[str, PoolPass] | None:
        """One pass over every pool; None when another scheduler holds the lease."""
        if not self.is_leader():
            return None
        with session_scope(self.settings.database_url) as session:
            consumers = fleet.live_workers(session, self.settings.worker_timeout_s)
        return {pool: self._pool(pool, consumers.get(pool, 0)) for pool in self.pools}

    def _pool(self, pool: str, consumers: int) -> PoolPass:
        result = PoolPass(consumers=consumers)
        queue = queue_for_pool(pool)
        in_queue = queued_job_ids(self.broker, pool)
        if in_queue is None:
            log.warning("%s holds more than the inspection limit; releasing nothing", queue)
            return result
        result.in_queue = len(in_queue)
        grace = utcnow() - timedelta(seconds=self.settings.release_grace_s)
        with session_scope(self.settings.database_url) as session:
            released = session.execute(_RELEASED, {"pool": pool}).all()
            lost = [r.id for r in released if r.id not in in_queue and r.dispatched_at < grace]
            result.lost = transitions.unrelease(session, lost, "message lost, waiting again")
        if result.lost:
            log.warning("%d job(s) of %s lost their message; waiting again", len(lost), queue)
        pending = max(len(in_queue), len(released) - len(result.lost))
        room = self.settings.release_per_worker * consumers - pending
        if room <= 0:
            return result
        with session_scope(self.settings.database_url) as session:
            chosen = choose(session, pool, room, self.settings.fair_share_half_life_s)
            priority = dict(chosen)
            released = set(transitions.release(session, [job_id for job_id, _ in chosen], queue))
            marked = [job_id for job_id, _ in chosen if job_id in released]  # chosen order
        if not marked:
            return result
        try:
            publish_many(self.settings, [(job_id, pool, priority[job_id]) for job_id in marked])
        except Exception as err:
            # What was sent stays released (its message exists); the rest waits again. Not
            # knowing which, we leave them all released: the next passes find the missing
            # ones missing from the queue and put them back to waiting after the grace.
            log.warning("publishing to %s failed (broker down?): %s", queue, err)
            return result
        result.released = marked
        log.info("released %d job(s) to %s", len(marked), queue)
        return result
