"""The schema (Alembic) and the job state machine, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import uuid

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, select

from fvb_core.db import transitions
from fvb_core.db.migrate import downgrade, upgrade
from fvb_core.db.models import Base, Job, JobEvent
from fvb_core.db.session import session_scope
from fvb_tools.localstack.postgres import create_database


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> str:
    """A fresh, migrated database of each kind."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'fvb.db'}"
    else:
        server = request.getfixturevalue("postgres_server")
        url = create_database(server.url, f"t_{uuid.uuid4().hex[:12]}")
    upgrade(url)
    return url


def _job(**overrides) -> Job:
    values = dict(tenant="acme", model="tiny", params={"prompt": "a cat"}, max_attempts=2)
    values.update(overrides)
    return Job(**values)


def _events(url: str, job_id: str) -> list[tuple]:
    with session_scope(url) as session:
        rows = session.execute(
            select(JobEvent.from_status, JobEvent.to_status, JobEvent.attempt)
            .where(JobEvent.job_id == job_id)
            .order_by(JobEvent.id)
        ).all()
    return [tuple(r) for r in rows]


def test_models_match_the_migrated_schema(db_url):
    engine = create_engine(db_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def test_upgrade_then_downgrade_base_removes_every_table(db_url):
    downgrade(db_url, "base")
    engine = create_engine(db_url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    upgrade(db_url)
    engine = create_engine(db_url)
    assert {"jobs", "job_events", "api_keys", "batches"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_full_life_cycle_records_each_transition_once(db_url):
    with session_scope(db_url) as session:
        job_id = transitions.create_job(session, _job()).id
    with session_scope(db_url) as session:
        claim = transitions.claim(session, job_id, "w1")
    assert claim is not None and claim.attempt == 1
    with session_scope(db_url) as session:
        beat = transitions.heartbeat(session, job_id, 1, progress=40)
    assert beat.still_owner and not beat.cancel_requested
    with session_scope(db_url) as session:
        assert transitions.succeed(session, job_id, 1, "videos/x/attempt-1.mp4", 10, "ab" * 32)
    with session_scope(db_url) as session:
        job = session.get(Job, job_id)
        assert (job.status, job.progress, job.output_bytes) == ("succeeded", 100, 10)
        assert job.finished_at is not None and job.finished_at.tzinfo is not None
    assert _events(db_url, job_id) == [
        (None, "queued", 0),
        ("queued", "running", 1),
        ("running", "succeeded", 1),
    ]


def test_redelivered_message_cannot_claim_a_running_job(db_url):
    with session_scope(db_url) as session:
        job_id = transitions.create_job(session, _job()).id
    with session_scope(db_url) as session:
        assert transitions.claim(session, job_id, "w1").attempt == 1
    with session_scope(db_url) as session:
        assert transitions.claim(session, job_id, "w2") is None
        assert session.get(Job, job_id).worker_id == "w1"


def test_stale_attempt_cannot_overwrite_the_winning_attempt(db_url):
    with session_scope(db_url) as session:
        job_id = transitions.create_job(session, _job()).id
    with session_scope(db_url) as session:
        transitions.claim(session, job_id, "w1")
    # Worker 1 goes silent; the reaper requeues, worker 2 takes attempt 2 and wins.
    with session_scope(db_url) as session:
        assert transitions.requeue_stale(session, timeout_s=-1) == [job_id]
    with session_scope(db_url) as session:
        assert transitions.claim(session, job_id, "w2").attempt == 2
    with session_scope(db_url) as session:
        assert transitions.succeed(session, job_id, 2, "videos/x/attempt-2.mp4", 5, "cd" * 32)
    with session_scope(db_url) as session:
        assert not transitions.heartbeat(session, job_id, 1, progress=99).still_owner
        assert not transitions.succeed(session, job_id, 1, "videos/x/attempt-1.mp4", 7, "ef" * 32)
        assert not transitions.fail(session, job_id, 1, "internal_error", "late")
        assert not transitions.finish_cancelled(session, job_id, 1)
    with session_scope(db_url) as session:
        job = session.get(Job, job_id)
        assert (job.status, job.attempt, job.output_key) == (
            "succeeded",
            2,
            "videos/x/attempt-2.mp4",
        )
        assert job.progress == 100
    assert [e[1] for e in _events(db_url, job_id)] == [
        "queued",
        "running",
        "queued",
        "running",
        "succeeded",
    ]


def test_reaper_fails_a_job_whose_last_attempt_went_silent(db_url):
    with session_scope(db_url) as session:
        job_id = transitions.create_job(session, _job(max_attempts=1)).id
    with session_scope(db_url) as session:
        transitions.claim(session, job_id, "w1")
    with session_scope(db_url) as session:
        assert transitions.requeue_stale(session, timeout_s=-1) == []
    with session_scope(db_url) as session:
        job = session.get(Job, job_id)
        assert (job.status, job.error_code) == ("failed", "worker_lost")


def test_cancel_queued_is_immediate_and_running_is_flagged_for_the_worker(db_url):
    with session_scope(db_url) as session:
        queued = transitions.create_job(session, _job()).id
        running = transitions.create_job(session, _job()).id
    with session_scope(db_url) as session:
        transitions.claim(session, running, "w1")
    with session_scope(db_url) as session:
        assert transitions.request_cancel(session, queued) == "cancelled"
        assert transitions.request_cancel(session, running) == "running"
    with session_scope(db_url) as session:
        assert transitions.claim(session, queued, "w2") is None  # a late message does nothing
        assert transitions.heartbeat(session, running, 1).cancel_requested
        assert transitions.finish_cancelled(session, running, 1)
    with session_scope(db_url) as session:
        for job_id in (queued, running):
            job = session.get(Job, job_id)
            assert (job.status, job.error_code) == ("cancelled", "cancelled")


def test_transient_failure_requeues_until_attempts_run_out(db_url):
    with session_scope(db_url) as session:
        job_id = transitions.create_job(session, _job(max_attempts=2)).id
    for attempt, expected in ((1, "queued"), (2, "failed")):
        with session_scope(db_url) as session:
            assert transitions.claim(session, job_id, "w").attempt == attempt
        with session_scope(db_url) as session:
            transitions.retry_later(session, job_id, attempt, "storage_unavailable", "S3 down")
        with session_scope(db_url) as session:
            job = session.get(Job, job_id)
            assert job.status == expected
            assert job.error_code == "storage_unavailable"


def test_idempotency_key_is_unique_per_tenant(db_url):
    from sqlalchemy.exc import IntegrityError

    with session_scope(db_url) as session:
        transitions.create_job(session, _job(idempotency_key="k1"))
        transitions.create_job(session, _job(idempotency_key="k1", tenant="other"))
    with pytest.raises(IntegrityError), session_scope(db_url) as session:
        transitions.create_job(session, _job(idempotency_key="k1"))


def test_cancel_requested_while_storing_refuses_success(db_url):
    with session_scope(db_url) as session:
        job_id = transitions.create_job(session, _job()).id
    with session_scope(db_url) as session:
        transitions.claim(session, job_id, "w1")
    with session_scope(db_url) as session:
        assert transitions.request_cancel(session, job_id) == "running"
    with session_scope(db_url) as session:
        assert not transitions.succeed(session, job_id, 1, "videos/x/attempt-1.mp4", 1, "0" * 64)
        assert transitions.finish_cancelled(session, job_id, 1)
    with session_scope(db_url) as session:
        job = session.get(Job, job_id)
        assert (job.status, job.output_key) == ("cancelled", None)


def test_higher_api_priority_is_served_first_by_redis():
    from fvb_core.queue import priority_level

    assert priority_level(10) == 0 < priority_level(0) < priority_level(-10) == 9
    assert priority_level(99) == 0 and priority_level(-99) == 9
