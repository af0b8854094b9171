"""The reaper against a migrated SQLite file and a real Valkey broker: stale running jobs go
back to the queue, and queued jobs whose message is missing are dispatched again."""

from __future__ import annotations

import base64
import json
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import select, update

from fvb_core.db import transitions
from fvb_core.db.migrate import upgrade
from fvb_core.db.models import Job, JobEvent, utcnow
from fvb_core.db.session import session_scope
from fvb_core.settings import Settings
from fvb_tools.localstack.ports import free_port
from scheduler.reaper import run_reaper, run_reaper_once

MODEL, POOL = "tiny-t2v", "reaper-test"
QUEUE = f"gpu.{POOL}"


@pytest.fixture(scope="module")
def settings(tmp_path_factory, tiny_t2v, valkey_server) -> Settings:
    folder = tmp_path_factory.mktemp("reaper")
    config = folder / "models.toml"
    config.write_text(f'[models."{MODEL}"]\npath = "{tiny_t2v}"\npool = "{POOL}"\n')
    url = f"sqlite:///{folder / 'fvb.db'}"
    upgrade(url)
    return Settings(
        database_url=url,
        broker_url=valkey_server.url,
        models_config=Path(config),
        heartbeat_timeout_s=60,
        redispatch_after_s=120,
        reaper_interval_s=0.05,
    )


@pytest.fixture(scope="module")
def broker(valkey_server) -> redis.Redis:
    return redis.Redis.from_url(valkey_server.url)


@pytest.fixture(autouse=True)
def quiet(settings, broker):
    """Each test starts with nothing for the reaper to do and an empty queue."""
    run_reaper_once(settings)
    broker.delete(*broker.keys(f"{QUEUE}*") or ["-"])


def new_job(settings, model=MODEL, max_attempts=3, priority=0) -> str:
    with session_scope(settings.database_url) as session:
        job = transitions.create_job(
            session,
            Job(
                tenant="acme",
                model=model,
                params={"prompt": "a cat"},
                priority=priority,
                max_attempts=max_attempts,
            ),
        )
        return job.id


def running_job(settings, silent_for_s: float, max_attempts=3) -> str:
    """A job claimed by a worker whose last heartbeat was `silent_for_s` ago."""
    job_id = new_job(settings, max_attempts=max_attempts)
    with session_scope(settings.database_url) as session:
        assert transitions.claim(session, job_id, "worker-gone")
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(heartbeat_at=utcnow() - timedelta(seconds=silent_for_s))
        )
    return job_id


def load(settings, job_id) -> Job:
    with session_scope(settings.database_url) as session:
        return session.get(Job, job_id)


def transitions_of(settings, job_id) -> list[tuple]:
    with session_scope(settings.database_url) as session:
        rows = session.execute(
            select(JobEvent.from_status, JobEvent.to_status, JobEvent.attempt, JobEvent.detail)
            .where(JobEvent.job_id == job_id)
            .order_by(JobEvent.id)
        ).all()
    return [tuple(row) for row in rows]


def messages(broker) -> list[str]:
    ids = []
    for key in broker.keys(f"{QUEUE}*"):
        for raw in broker.lrange(key, 0, -1):
            args, _, _ = json.loads(base64.b64decode(json.loads(raw)["body"]))
            ids.append(args[0])
    return sorted(ids)


def test_silent_running_job_is_requeued_and_dispatched_again(settings, broker):
    job_id = running_job(settings, silent_for_s=600)
    result = run_reaper_once(settings)
    assert result["requeued"] == [job_id]
    assert result["dispatched"] == [job_id]
    assert transitions_of(settings, job_id) == [
        (None, "queued", 0, None),
        ("queued", "running", 1, "worker worker-gone"),
        ("running", "queued", 1, "worker_lost"),
    ]
    job = load(settings, job_id)
    assert (job.status, job.attempt) == ("queued", 1)
    assert job.dispatched_at is not None
    assert messages(broker) == [job_id]


def test_silent_job_whose_cancel_was_asked_ends_cancelled_not_queued(settings, broker):
    job_id = running_job(settings, silent_for_s=600)
    with session_scope(settings.database_url) as session:
        assert transitions.request_cancel(session, job_id) == "running"
    result = run_reaper_once(settings)
    assert result["requeued"] == [] and job_id not in result["dispatched"]
    job = load(settings, job_id)
    assert (job.status, job.error_code) == ("cancelled", "cancelled")
    assert transitions_of(settings, job_id)[-1] == ("running", "cancelled", 1, "worker_lost")
    assert job_id not in messages(broker)


def test_queued_job_never_dispatched_gets_dispatched(settings, broker):
    job_id = new_job(settings)
    assert load(settings, job_id).dispatched_at is None
    result = run_reaper_once(settings)
    assert result == {
        "requeued": [],
        "dispatched": [job_id],
        "undispatchable": [],
        "dispatch_failed": [],
    }
    assert load(settings, job_id).dispatched_at is not None
    assert messages(broker) == [job_id]
    # Dispatched a moment ago: the next pass leaves it alone.
    assert run_reaper_once(settings)["dispatched"] == []
    assert messages(broker) == [job_id]


def test_message_lost_long_ago_is_sent_again(settings, broker):
    job_id = new_job(settings)
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(dispatched_at=utcnow() - timedelta(seconds=settings.redispatch_after_s + 5))
        )
    assert run_reaper_once(settings)["dispatched"] == [job_id]
    assert messages(broker) == [job_id]


def test_heart_beating_job_and_cancelled_job_are_left_alone(settings, broker):
    alive = running_job(settings, silent_for_s=5)
    cancelled = new_job(settings)
    with session_scope(settings.database_url) as session:
        transitions.request_cancel(session, cancelled)
    result = run_reaper_once(settings)
    assert result["requeued"] == [] and result["dispatched"] == []
    assert load(settings, alive).status == "running"
    assert messages(broker) == []


def test_silent_job_on_its_last_attempt_fails_instead(settings, broker):
    job_id = running_job(settings, silent_for_s=600, max_attempts=1)
    result = run_reaper_once(settings)
    assert result["requeued"] == [] and result["dispatched"] == []
    job = load(settings, job_id)
    assert (job.status, job.error_code) == ("failed", "worker_lost")
    assert messages(broker) == []


def test_job_of_a_model_no_longer_served_stays_queued(settings, broker):
    job_id = new_job(settings, model="retired-model")
    result = run_reaper_once(settings)
    assert result["undispatchable"] == [job_id] and result["dispatched"] == []
    assert load(settings, job_id).dispatched_at is None
    assert messages(broker) == []
    with session_scope(settings.database_url) as session:  # out of the way of later tests
        transitions.request_cancel(session, job_id)


def test_broker_down_leaves_jobs_for_the_next_pass(settings, broker):
    first, second = new_job(settings), new_job(settings)
    down = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})
    result = run_reaper_once(down)
    assert result["dispatched"] == []
    assert sorted(result["dispatch_failed"]) == sorted([first, second])
    assert load(settings, first).dispatched_at is None
    assert sorted(run_reaper_once(settings)["dispatched"]) == sorted([first, second])
    assert messages(broker) == sorted([first, second])


def test_reaper_loop_runs_passes_until_stopped(settings, broker):
    stop = threading.Event()
    thread = threading.Thread(target=run_reaper, args=(settings, stop), daemon=True)
    thread.start()
    try:
        job_id = new_job(settings)
        deadline = time.monotonic() + 10
        while load(settings, job_id).dispatched_at is None:
            assert time.monotonic() < deadline, "the loop never dispatched the job"
            time.sleep(0.05)
        assert messages(broker) == [job_id]
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
