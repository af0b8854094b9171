"""The scheduler against a migrated database and a real Valkey broker: the database is the
queue, Redis holds at most the bound per live consumer, the order is decided at release time
(priority, then fair share by GPU work, then age), lost messages come back, stale jobs are
reaped, and two scheduler processes release each job once.

Consumers here are the tests themselves: a row in the workers' registry, and a loop that
takes messages off the Redis lists in the order a Celery worker would (lowest priority level
first, oldest first within one) and claims and finishes the job."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import select, update

from fvb_core.db import fleet, transitions
from fvb_core.db.migrate import upgrade
from fvb_core.db.models import Job, JobEvent, Lease, Worker, utcnow
from fvb_core.db.session import session_scope
from fvb_core.queue import queue_for_pool
from fvb_core.settings import Settings
from fvb_tools.localstack import start_postgres, start_valkey
from fvb_tools.localstack.process import die_with_parent
from scheduler.process import run_pass, run_scheduler
from scheduler.release import LEASE, Releaser

MODEL = "tiny-t2v"
REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


# -- a scene: one database, one pool, the broker --------------------------------------------


@dataclass
class Scene:
    settings: Settings
    broker: redis.Redis
    pool: str

    @property
    def url(self) -> str:
        return self.settings.database_url

    @property
    def queue(self) -> str:
        return queue_for_pool(self.pool)

    def add(self, tenant: str, count: int, priority: int = 0, work: float = 1.0) -> list[str]:
        with session_scope(self.url) as session:
            rows = [
                Job(
                    tenant=tenant,
                    model=MODEL,
                    pool=self.pool,
                    params={"prompt": f"{tenant} {i}"},
                    priority=priority,
                    work=work,
                )
                for i in range(count)
            ]
            transitions.create_jobs(session, rows)
            return [row.id for row in rows]

    def consumer(self, name: str = "c1", beat_ago_s: float = 0.0) -> str:
        worker_id = f"{name}@{self.pool}"
        with session_scope(self.url) as session:
            fleet.register_worker(session, worker_id, self.pool, 1, "test", os.getpid())
            if beat_ago_s:
                session.execute(
                    update(Worker)
                    .where(Worker.id == worker_id)
                    .values(heartbeat_at=utcnow() - timedelta(seconds=beat_ago_s))
                )
        return worker_id

    def queue_keys(self) -> list[str]:
        return [self.queue] + [f"{self.queue}\x06\x16{level}" for level in range(1, 10)]

    def in_queue(self) -> list[str]:
        """Job ids waiting in the pool's queue, in the order a worker takes them."""
        ids = []
        for key in self.queue_keys():
            for raw in reversed(self.broker.lrange(key, 0, -1)):  # LPUSH in, RPOP out
                ids.append(json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0])
        return ids

    def take(self, count: int = 1, finish: bool = True) -> list[str]:
        """A worker taking ``count`` messages: pop, claim, and (``finish``) succeed."""
        taken = []
        for _ in range(count):
            raw = next((r for k in self.queue_keys() if (r := self.broker.rpop(k))), None)
            if raw is None:
                break
            job_id = json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0]
            with session_scope(self.url) as session:
                claim = transitions.claim(session, job_id, "test-worker")
                if claim and finish:
                    transitions.succeed(session, job_id, claim.attempt, "k", 1, "0" * 64)
            taken.append(job_id)
        return taken

    def releases(self, job_id: str) -> int:
        with session_scope(self.url) as session:
            return len(
                session.execute(
                    select(JobEvent.id).where(
                        JobEvent.job_id == job_id, JobEvent.detail.startswith("released")
                    )
                ).all()
            )

    def starts(self) -> list[str]:
        """Job ids in the order they were claimed (queued -> running events)."""
        with session_scope(self.url) as session:
            return list(
                session.execute(
                    select(JobEvent.job_id)
                    .where(JobEvent.from_status == "queued", JobEvent.to_status == "running")
                    .order_by(JobEvent.id)
                ).scalars()
            )


def _models_config(folder: Path, tiny_t2v: str, pool: str) -> Path:
    config = folder / "models.toml"
    config.write_text(f'[models."{MODEL}"]\npath = "{tiny_t2v}"\npool = "{pool}"\n')
    return config


@pytest.fixture
def scene(tmp_path, tiny_t2v, valkey_server) -> Iterator[Scene]:
    pool = f"sched-{uuid.uuid4().hex[:8]}"
    url = f"sqlite:///{tmp_path / 'fvb.db'}"
    upgrade(url)
    settings = Settings(
        database_url=url,
        broker_url=valkey_server.url,
        models_config=_models_config(tmp_path, tiny_t2v, pool),
        heartbeat_timeout_s=60,
        release_grace_s=0.5,
        release_per_worker=2,
    )
    broker = redis.Redis.from_url(valkey_server.url)
    scene = Scene(settings, broker, pool)
    yield scene
    broker.delete(*scene.queue_keys())
    broker.close()


def releaser(scene: Scene) -> Releaser:
    from fvb_core.models_config import load_models_config

    return Releaser(scene.settings, load_models_config(scene.settings.models_config))


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- the bound -----------------------------------------------------------------------------


def test_nothing_is_released_without_a_live_consumer_and_then_only_the_bound(scene):
    scene.add("acme", 50)
    rel = releaser(scene)
    assert rel.run_once()[scene.pool].released == []
    scene.consumer("gone", beat_ago_s=600)  # its beats stopped long ago: not counted
    assert rel.run_once()[scene.pool].released == []
    scene.consumer("c1")
    first = rel.run_once()[scene.pool]
    assert (len(first.released), first.consumers) == (2, 1)
    assert scene.in_queue() == first.released
    assert rel.run_once()[scene.pool].released == []  # full: nothing more
    scene.consumer("c2")
    assert len(rel.run_once()[scene.pool].released) == 2
    assert len(scene.in_queue()) == 4


def test_twenty_thousand_queued_jobs_redis_never_holds_more_than_the_bound(scene):
    ids = scene.add("acme", 20_000)
    scene.consumer("c1")
    rel = releaser(scene)
    seen: list[int] = []
    for _ in range(60):
        rel.run_once()
        seen.append(len(scene.in_queue()))
        scene.take(1)
    rel.run_once()
    seen.append(len(scene.in_queue()))
    assert max(seen) == 2 and seen[-1] == 2, seen
    # Within one tenant and priority, oldest first.
    assert scene.starts() == ids[:60]
    with session_scope(scene.url) as session:
        released = session.execute(
            select(Job.id).where(Job.status == "queued", Job.dispatched_at.is_not(None))
        ).scalars()
        assert sorted(released) == sorted(ids[60:62])


# -- order at release time -------------------------------------------------------------------


def drain(scene: Scene, rel: Releaser, until, limit: int = 2000) -> None:
    for _ in range(limit):
        if until():
            return
        rel.run_once()
        scene.take(1)
    raise AssertionError("did not get there")


def test_interactive_videos_of_another_tenant_start_before_the_next_ten_of_a_bulk_backlog(scene):
    """Tenant A queues 500 bulk videos (batch priority -5), tenant B then 5 interactive ones:
    all of B's start before A's next 10 (read from the events table)."""
    scene.consumer()
    rel = releaser(scene)
    bulk = scene.add("tenant-a", 500, priority=-5)
    drain(scene, rel, lambda: len(scene.starts()) >= 20)
    interactive = scene.add("tenant-b", 5, priority=0)
    before = len(scene.starts())
    drain(scene, rel, lambda: set(interactive) <= set(scene.starts()))
    after = scene.starts()[before:]
    last_b = max(after.index(job_id) for job_id in interactive)
    a_meanwhile = [j for j in after[:last_b] if j in set(bulk)]
    assert len(a_meanwhile) < 10, after[: last_b + 1]


def test_equal_priority_tenants_share_the_queue_not_first_come(scene):
    """Same priority: tenant B's 5 videos, queued after A's 500, are not held behind them."""
    scene.consumer()
    rel = releaser(scene)
    backlog = set(scene.add("tenant-a", 500))
    drain(scene, rel, lambda: len(scene.starts()) >= 10)
    late = scene.add("tenant-b", 5)
    before = len(scene.starts())
    drain(scene, rel, lambda: set(late) <= set(scene.starts()))
    after = scene.starts()[before:]
    assert len([j for j in after if j in backlog]) <= 10, after


def test_fair_share_weighs_tenants_by_gpu_work_not_job_count(scene):
    scene.consumer()
    rel = releaser(scene)
    heavy = set(scene.add("heavy", 300, work=4.0))
    light = set(scene.add("light", 300, work=1.0))
    drain(scene, rel, lambda: len(scene.starts()) >= 100)
    started = scene.starts()[:100]
    n_heavy = len([j for j in started if j in heavy])
    n_light = len([j for j in started if j in light])
    assert n_heavy + n_light == 100
    # Equal work each: about 4 light videos per heavy one.
    assert 3 * n_heavy <= n_light <= 5 * n_heavy, (n_heavy, n_light)


def test_a_late_interactive_job_overtakes_bulk_that_waited_longer(scene):
    scene.consumer()
    bulk = scene.add("acme", 100, priority=-5)
    urgent = scene.add("acme", 1, priority=3)
    passes = releaser(scene).run_once()[scene.pool]
    assert passes.released[0] == urgent[0] and passes.released[1] == bulk[0]


# -- lost messages, a broker that is down or comes back empty --------------------------------


def test_lost_messages_are_released_again_and_kept_ones_never_twice(scene):
    scene.settings = scene.settings.model_copy(update={"release_per_worker": 30})
    scene.consumer()
    rel = releaser(scene)
    ids = scene.add("acme", 40)
    assert len(rel.run_once()[scene.pool].released) == 30
    waiting = scene.in_queue()
    lost = waiting[:10]
    for key in scene.queue_keys():  # ten messages vanish (a partial loss)
        for raw in scene.broker.lrange(key, 0, -1):
            if json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0] in lost:
                scene.broker.lrem(key, 1, raw)
    wait_for(
        lambda: rel.run_once() is not None and set(lost) <= set(scene.in_queue()),
        10,
        "the lost messages back in the queue",
    )
    assert len(scene.in_queue()) == 30
    assert {job_id: scene.releases(job_id) for job_id in lost} == dict.fromkeys(lost, 2)
    kept = [job_id for job_id in waiting if job_id not in lost]
    assert {job_id: scene.releases(job_id) for job_id in kept} == dict.fromkeys(kept, 1)
    assert all(scene.releases(job_id) == 0 for job_id in ids if job_id not in waiting)


def test_broker_restarted_empty_every_released_job_runs_again_within_ten_seconds(
    tmp_path, tiny_t2v
):
    pool = f"sched-{uuid.uuid4().hex[:8]}"
    url = f"sqlite:///{tmp_path / 'fvb.db'}"
    upgrade(url)
    with start_valkey(tmp_path / "valkey") as valkey:
        settings = Settings(
            database_url=url,
            broker_url=valkey.url,
            models_config=_models_config(tmp_path, tiny_t2v, pool),
            release_grace_s=2.0,
            release_per_worker=30,
        )
        scene = Scene(settings, redis.Redis.from_url(valkey.url), pool)
        scene.consumer()
        scene.add("acme", 30)
        stop = threading.Event()
        loop = threading.Thread(target=run_scheduler, args=(settings, stop), daemon=True)
        loop.start()
        try:
            wait_for(lambda: len(scene.in_queue()) == 30, 10, "30 jobs released")
            released = set(scene.in_queue())
            valkey.stop()
            shutil.rmtree(valkey.data_dir / "appendonlydir", ignore_errors=True)
            valkey.start()  # same port, nothing in it
            assert scene.in_queue() == []
            wait_for(lambda: set(scene.in_queue()) == released, 10, "every job released again")
            assert len(scene.in_queue()) == 30  # once each
        finally:
            stop.set()
            loop.join(10)
        scene.broker.close()


def test_broker_down_releases_nothing_and_the_jobs_go_once_it_is_back(scene, valkey_server):
    scene.consumer()
    ids = scene.add("acme", 3)
    rel = releaser(scene)
    valkey_server.stop()
    try:
        with pytest.raises(redis.ConnectionError):
            rel.run_once()
    finally:
        valkey_server.start()
    with session_scope(scene.url) as session:
        marked = session.execute(select(Job.id).where(Job.dispatched_at.is_not(None))).all()
    assert marked == []
    rel._redis = None  # a new connection to the restarted server
    assert rel.run_once()[scene.pool].released == ids[:2]


# -- the reaper --------------------------------------------------------------------------------


def _running(scene: Scene, silent_for_s: float, max_attempts: int = 3) -> str:
    with session_scope(scene.url) as session:
        job = transitions.create_job(
            session,
            Job(tenant="acme", model=MODEL, pool=scene.pool, params={"prompt": "p"},
                max_attempts=max_attempts),
        )  # fmt: skip
        job_id = job.id
    with session_scope(scene.url) as session:
        assert transitions.claim(session, job_id, "worker-gone")
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(heartbeat_at=utcnow() - timedelta(seconds=silent_for_s))
        )
    return job_id


def test_silent_jobs_are_reaped_in_one_pass_then_released_again(scene):
    scene.consumer()
    requeue = _running(scene, 600)
    last = _running(scene, 600, max_attempts=1)
    asked = _running(scene, 600)
    alive = _running(scene, 5)
    with session_scope(scene.url) as session:
        assert transitions.request_cancel(session, asked) == "running"
    result = run_pass(scene.settings, releaser(scene))
    assert result["requeued"] == [requeue]
    assert result["released"][scene.pool] == [requeue]
    with session_scope(scene.url) as session:
        rows = {j.id: j for j in session.execute(select(Job)).scalars()}
    assert (rows[requeue].status, rows[requeue].attempt) == ("queued", 1)
    assert "during attempt 1" in rows[requeue].error_message
    assert (rows[last].status, rows[last].error_code) == ("failed", "worker_lost")
    assert "no attempts left" in rows[last].error_message
    assert (rows[asked].status, rows[asked].error_code) == ("cancelled", "cancelled")
    assert rows[alive].status == "running"
    with session_scope(scene.url) as session:
        assert transitions.queued_of(session, "acme") == 1


def test_the_scheduler_loop_releases_until_stopped(scene):
    scene.consumer()
    stop = threading.Event()
    loop = threading.Thread(target=run_scheduler, args=(scene.settings, stop), daemon=True)
    loop.start()
    try:
        (job_id,) = scene.add("acme", 1)
        wait_for(lambda: scene.in_queue() == [job_id], 10, "the job released")
    finally:
        stop.set()
        loop.join(10)
    assert not loop.is_alive()
    with session_scope(scene.url) as session:  # it gave the lease up on the way out
        lease = session.get(Lease, LEASE)
        assert lease.expires_at < utcnow()


# -- two scheduler processes -------------------------------------------------------------------


def test_two_scheduler_processes_over_postgres_release_each_job_once(
    tmp_path, tiny_t2v, valkey_server
):
    pool = f"sched-{uuid.uuid4().hex[:8]}"
    with start_postgres(tmp_path / "pg") as postgres:
        url = postgres.url
        upgrade(url)
        settings = Settings(
            database_url=url,
            broker_url=valkey_server.url,
            models_config=_models_config(tmp_path, tiny_t2v, pool),
            release_per_worker=20,
        )
        scene = Scene(settings, redis.Redis.from_url(valkey_server.url), pool)
        ids = [
            j for tenant, n in (("a", 334), ("b", 333), ("c", 333)) for j in scene.add(tenant, n)
        ]
        scene.consumer()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("FVB_")},
            "PYTHONPATH": str(REPO),
            "FVB_DATABASE_URL": url,
            "FVB_BROKER_URL": valkey_server.url,
            "FVB_MODELS_CONFIG": str(settings.models_config),
            "FVB_RELEASE_PER_WORKER": "20",
            "FVB_RELEASE_INTERVAL_S": "0.05",
            "FVB_SCHEDULER_LEASE_S": "2",
        }
        schedulers = [
            subprocess.Popen(
                [sys.executable, "-m", "fvb_tools.cli", "scheduler"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=open(tmp_path / f"scheduler-{n}.log", "wb"),  # noqa: SIM115
                preexec_fn=die_with_parent(),
            )
            for n in range(2)
        ]
        try:
            done: set[str] = set()
            stepped_down = False
            deadline = time.monotonic() + 240
            while len(done) < 1000:
                assert time.monotonic() < deadline, f"only {len(done)} of 1000 ran"
                done.update(scene.take(20))
                with session_scope(url) as session:
                    fleet.beat_worker(session, f"c1@{pool}")
                if len(done) >= 400 and not stepped_down:
                    # The leader stops (SIGTERM: it gives the lease up); the other takes over.
                    with session_scope(url) as session:
                        holder = session.get(Lease, LEASE).holder
                    leader = next(p for p in schedulers if f":{p.pid}" in holder)
                    leader.send_signal(signal.SIGTERM)
                    assert leader.wait(30) == 0
                    stepped_down = True
                time.sleep(0.01)
        finally:
            for process in schedulers:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()
            scene.broker.close()
        assert done == set(ids)
        with session_scope(url) as session:
            releases = Counter(
                session.execute(
                    select(JobEvent.job_id).where(JobEvent.detail.startswith("released"))
                ).scalars()
            )
            statuses = Counter(session.execute(select(Job.status)).scalars())
        assert statuses == {"succeeded": 1000}
        assert set(releases.values()) == {1} and len(releases) == 1000
