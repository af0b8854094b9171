"""Who is there to do the work: the workers' registry (each Celery consumer beats a row) and
named leases (one scheduler process at a time releases jobs).

Every write is one statement; the caller commits.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from fvb_core.db.models import Lease, Worker, WorkerModels, utcnow


def _upsert(session: Session):
    return {"sqlite": sqlite.insert, "postgresql": postgresql.insert}[
        session.get_bind().dialect.name
    ]


def register_worker(
    session: Session, worker_id: str, pool: str, gpus: int, host: str, pid: int
) -> None:
    """The consumer is up (again): its row, beaten now."""
    now = utcnow()
    values = dict(pool=pool, gpus=gpus, host=host, pid=pid, heartbeat_at=now, stopped_at=None)
    session.execute(
        _upsert(session)(Worker)
        .values(id=worker_id, started_at=now, **values)
        .on_conflict_do_update(index_elements=[Worker.id], set_={**values, "started_at": now})
    )


def beat_worker(session: Session, worker_id: str, stats: dict | None = None) -> bool:
    """Record that the consumer is alive (with what it says of itself, ``stats``); False if
    its row is gone (register again)."""
    values: dict = dict(heartbeat_at=utcnow(), stopped_at=None)
    if stats is not None:
        values["stats"] = stats
    result = session.execute(update(Worker).where(Worker.id == worker_id).values(**values))
    return result.rowcount == 1


def stop_worker(session: Session, worker_id: str) -> None:
    session.execute(update(Worker).where(Worker.id == worker_id).values(stopped_at=utcnow()))


def live_workers(session: Session, timeout_s: float) -> dict[str, int]:
    """Pool -> consumers that beat within ``timeout_s`` and have not said they stopped."""
    cutoff = utcnow() - timedelta(seconds=timeout_s)
    return dict(
        session.execute(
            select(Worker.pool, func.count())
            .where(Worker.heartbeat_at >= cutoff, Worker.stopped_at.is_(None))
            .group_by(Worker.pool)
        ).all()
    )


def hold_lease(session: Session, name: str, holder: str, ttl_s: float) -> bool:
    """Take or renew the lease ``name`` for ``ttl_s`` seconds; False while another holder's
    lease has not expired. One statement: insert, or take over only what is free or ours."""
    now = utcnow()
    expires = now + timedelta(seconds=ttl_s)
    statement = (
        _upsert(session)(Lease)
        .values(name=name, holder=holder, expires_at=expires)
        .on_conflict_do_update(
            index_elements=[Lease.name],
            set_={"holder": holder, "expires_at": expires},
            where=(Lease.holder == holder) | (Lease.expires_at < now),
        )
        .returning(Lease.holder)
    )
    return session.execute(statement).scalar_one_or_none() == holder


def release_lease(session: Session, name: str, holder: str) -> None:
    """Give the lease up (a stopping scheduler), so another takes over at once."""
    session.execute(
        update(Lease)
        .where(Lease.name == name, Lease.holder == holder)
        .values(expires_at=utcnow() - timedelta(seconds=1))
    )


def record_models(session: Session, job_worker_id: str, models: list[str]) -> None:
    """The models the job process ``job_worker_id`` holds loaded now."""
    now = utcnow()
    session.execute(
        _upsert(session)(WorkerModels)
        .values(job_worker_id=job_worker_id, models=models, updated_at=now)
        .on_conflict_do_update(
            index_elements=[WorkerModels.job_worker_id], set_={"models": models, "updated_at": now}
        )
    )


def loaded_models(session: Session, job_worker_ids: list[str]) -> dict[str, list[str]]:
    if not job_worker_ids:
        return {}
    rows = session.execute(
        select(WorkerModels.job_worker_id, WorkerModels.models).where(
            WorkerModels.job_worker_id.in_(job_worker_ids)
        )
    ).all()
    return {job_worker_id: list(models) for job_worker_id, models in rows}
