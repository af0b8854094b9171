"""Retention: a rendered video gets ``expires_at`` from its retention, the sweeper deletes its
objects and marks it, the API shows it expired and its content answers 410; orphaned attempt
objects and unfinished multipart uploads older than the max age go, newer ones stay.

Real servers: Valkey, SeaweedFS, an SQLite file (and PostgreSQL for the expiry arithmetic),
one Celery worker rendering the tiny model, the API in a TestClient. The sweeper is called
with a ``now`` past the expiry (or past the max age) instead of waiting for the clock.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from fvb_core.api_keys import create_api_key
from fvb_core.db import transitions
from fvb_core.db.migrate import upgrade
from fvb_core.db.models import Job, JobEvent
from fvb_core.db.session import session_scope
from fvb_core.models_config import load_models_config
from fvb_core.settings import Settings
from fvb_core.storage import (
    StorageUnavailable,
    VideoStore,
    attempt_keys,
    input_image_key,
    video_key,
)
from fvb_tools.localstack.postgres import create_database
from scheduler.api.app import create_app
from scheduler.process import run_pass, run_scheduler
from scheduler.release import Releaser
from scheduler.sweeper import SweepState, sweep

from .test_worker import start_workers, stop_workers, wait_for, worker_settings

pytestmark = pytest.mark.timeout(120)

RETENTION_S = 2
MAX_AGE_S = 60
TINY = {"size": "32x32", "num_frames": 5, "num_inference_steps": 2, "guidance_scale": 1.0}


@pytest.fixture(scope="module")
def settings(tmp_path_factory, valkey_server, s3_server, tiny_t2v) -> Iterator[Settings]:
    tmp = tmp_path_factory.mktemp("retention")
    pool = f"rt{uuid.uuid4().hex[:8]}"
    config = tmp / "models.toml"
    config.write_text(
        f'[models."tiny"]\npath = "{tiny_t2v}"\npool = "{pool}"\n'
        'default_size = "32x32"\ndefault_fps = 8\nmax_frames = 33\nmax_steps = 20\n'
    )
    settings = worker_settings(
        f"sqlite:///{tmp / 'fvb.db'}",
        valkey_server,
        s3_server,
        pool,
        config,
        retention_s=RETENTION_S,
        orphan_max_age_s=MAX_AGE_S,
    )
    upgrade(settings.database_url)
    s3_server.client().create_bucket(Bucket=settings.s3_bucket)
    yield settings


@pytest.fixture(scope="module")
def store(settings) -> VideoStore:
    return VideoStore(settings)


@pytest.fixture(scope="module")
def api(settings) -> tuple[TestClient, dict[str, str]]:
    with session_scope(settings.database_url) as session:
        key = create_api_key(session, "acme")
    return TestClient(create_app(settings)), {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def worker(settings, tmp_path_factory):
    workers = start_workers(settings, tmp_path_factory.mktemp("retention-logs"), 1)
    yield workers[0]
    stop_workers(workers)


def row(settings: Settings, job_id: str) -> Job:
    with session_scope(settings.database_url) as session:
        return session.get(Job, job_id)


def keys(store: VideoStore, job_id: str) -> set[str]:
    return set(store.job_keys(job_id))


def fake_job(settings: Settings, **values) -> str:
    """A queued job written straight to the database (the worker is played by the test)."""
    values = {"tenant": "acme", "model": "tiny", "params": {"prompt": "p"}, **values}
    with session_scope(settings.database_url) as session:
        return transitions.create_job(session, Job(**values)).id


def fake_attempt(settings: Settings, store: VideoStore, job_id: str) -> int:
    """Claim the job and upload every object of the attempt, as a worker would."""
    with session_scope(settings.database_url) as session:
        attempt = transitions.claim(session, job_id, "test-worker").attempt
    for key in attempt_keys(job_id, attempt):
        store.put_bytes(key, key.encode(), "application/octet-stream")
    return attempt


def fake_success(settings: Settings, store: VideoStore, job_id: str) -> int:
    attempt = fake_attempt(settings, store, job_id)
    with session_scope(settings.database_url) as session:
        key = video_key(job_id, attempt)
        assert transitions.succeed(session, job_id, attempt, key, 3, hashlib.sha256().hexdigest())
    return attempt


# -- expiry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_succeed_sets_expires_at_from_the_jobs_retention(request, tmp_path, backend):
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'fvb.db'}"
    else:
        url = create_database(
            request.getfixturevalue("postgres_server").url, f"t_{uuid.uuid4().hex[:12]}"
        )
    upgrade(url)
    for retention in (RETENTION_S, 400 * 86400, None):
        with session_scope(url) as session:
            job_id = transitions.create_job(
                session, Job(tenant="a", model="m", params={}, retention_s=retention)
            ).id
        with session_scope(url) as session:
            attempt = transitions.claim(session, job_id, "w").attempt
            assert transitions.succeed(session, job_id, attempt, "k", 1, "h")
        with session_scope(url) as session:
            job = session.get(Job, job_id)
        if retention is None:
            assert job.expires_at is None
        else:
            expected = job.finished_at + timedelta(seconds=retention)
            assert abs(job.expires_at - expected) < timedelta(milliseconds=1), (backend, job)


def test_a_rendered_video_expires_the_sweeper_deletes_it_and_its_content_is_gone(
    settings, store, api, worker
):
    client, acme = api
    short_id, long_id = (
        client.post("/v1/videos", json={"model": "tiny", "prompt": p, **TINY}, headers=acme).json()[
            "id"
        ]
        for p in ("a fox", "an owl")
    )
    assert row(settings, short_id).retention_s == RETENTION_S  # the deployment's
    with session_scope(settings.database_url) as session:  # as a batch's retention would
        session.execute(update(Job).where(Job.id == long_id).values(retention_s=3600))
    releaser = Releaser(settings, load_models_config(settings.models_config))

    def released() -> bool:
        run_pass(settings, releaser)
        return all(row(settings, i).dispatched_at or row(settings, i).attempt for i in ids)

    ids = (short_id, long_id)
    wait_for(released, 10, "both released", interval=0.2)
    wait_for(
        lambda: {row(settings, i).status for i in (short_id, long_id)} == {"succeeded"},
        60,
        "both rendered",
    )
    job = row(settings, short_id)
    assert abs(job.expires_at - job.finished_at - timedelta(seconds=RETENTION_S)) < timedelta(
        milliseconds=1
    )
    stored = keys(store, short_id)
    assert set(attempt_keys(short_id, 1)) <= stored
    kept = keys(store, long_id)

    now = job.expires_at + timedelta(seconds=1)
    summary = sweep(settings, store, now=now, state=SweepState())
    assert summary.expired == [short_id]
    assert summary.expired_objects == len(stored)
    assert keys(store, short_id) == set()
    assert keys(store, long_id) == kept  # its expiry has not come
    job = row(settings, short_id)
    assert job.expired_at == now and job.status == "succeeded"
    with session_scope(settings.database_url) as session:
        detail = (
            session.execute(
                select(JobEvent.detail)
                .where(JobEvent.job_id == short_id)
                .order_by(JobEvent.id.desc())
            )
            .scalars()
            .first()
        )
    assert detail == "expired"

    video = client.get(f"/v1/videos/{short_id}", headers=acme).json()
    assert video["status"] == "completed"  # what the SDK's pollers stop on
    assert (video["expired"], video["expired_at"]) == (True, int(now.timestamp()))
    assert video["expires_at"] == int(job.expires_at.timestamp())
    listed = client.get("/v1/videos?limit=100", headers=acme).json()["data"]
    assert {v["id"]: v["expired"] for v in listed}[short_id] is True
    for query in ("", "?variant=thumbnail", "?variant=spritesheet", "?redirect=true"):
        response = client.get(
            f"/v1/videos/{short_id}/content{query}", headers=acme, follow_redirects=False
        )
        assert response.status_code == 410, (query, response.text)
        error = response.json()["error"]
        assert (error["code"], error["param"]) == ("video_expired", "video_id")
        when = job.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert f"expired at {when}" in error["message"]
        assert f"{RETENTION_S} s after it completed" in error["message"]
        assert "was deleted" in error["message"]

    video = client.get(f"/v1/videos/{long_id}", headers=acme).json()
    assert (video["expired"], video["expired_at"]) == (False, None)
    assert video["expires_at"] == int(row(settings, long_id).expires_at.timestamp())
    content = client.get(f"/v1/videos/{long_id}/content", headers=acme)
    assert content.status_code == 200 and content.content[4:8] == b"ftyp"

    again = sweep(settings, store, now=now, state=SweepState())  # harmless
    assert (again.expired, again.expired_objects, again.orphans) == ([], 0, [])
    assert row(settings, short_id).expired_at == now and keys(store, long_id) == kept


def test_past_expires_at_content_is_410_before_the_sweep_runs(settings, store, api):
    client, acme = api
    job_id = fake_job(settings, retention_s=1)
    fake_success(settings, store, job_id)
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(expires_at=datetime.now(UTC) - timedelta(1))
        )
    video = client.get(f"/v1/videos/{job_id}", headers=acme).json()
    assert (video["expired"], video["expired_at"]) == (True, None)
    error = client.get(f"/v1/videos/{job_id}/content", headers=acme).json()["error"]
    assert error["code"] == "video_expired" and "no longer available" in error["message"]
    sweep(settings, store, state=SweepState())
    assert keys(store, job_id) == set()


def test_a_sweep_that_fails_to_delete_marks_nothing_and_the_scheduler_sweeps_again(
    settings, store, monkeypatch
):
    job_id = fake_job(settings, retention_s=1)
    fake_success(settings, store, job_id)
    now = datetime.now(UTC)
    with session_scope(settings.database_url) as session:  # as if it finished a while ago
        session.execute(
            update(Job).where(Job.id == job_id).values(expires_at=now - timedelta(seconds=1))
        )

    def refused(_keys):
        raise StorageUnavailable("storage delete_objects failed: store is down")

    with monkeypatch.context() as patch:
        patch.setattr(store, "delete_many", refused)
        with pytest.raises(StorageUnavailable):
            sweep(settings, store, now=now, state=SweepState())
    assert row(settings, job_id).expired_at is None  # objects first, then the mark
    assert keys(store, job_id)

    # The scheduler process's sweeper thread.
    stop = threading.Event()
    fast = settings.model_copy(update={"sweep_interval_s": 0.1})
    loop = threading.Thread(target=run_scheduler, args=(fast, stop), daemon=True)
    loop.start()
    try:
        wait_for(lambda: row(settings, job_id).expired_at is not None, 10, "swept")
    finally:
        stop.set()
        loop.join(10)
    assert not loop.is_alive()
    assert keys(store, job_id) == set()


# -- orphans and unfinished uploads ----------------------------------------------------------


def test_orphaned_attempt_objects_and_stale_uploads_older_than_the_max_age_go(settings, store):
    client = store.client
    bucket = settings.s3_bucket

    def last_modified(key: str) -> datetime:
        return client.head_object(Bucket=bucket, Key=key)["LastModified"]

    # Old: written now, judged at a `now` more than MAX_AGE_S later.
    retried = fake_job(settings)  # attempt 1 lost (uploaded, never recorded), 2 won
    fake_attempt(settings, store, retried)
    with session_scope(settings.database_url) as session:
        transitions.retry_later(session, retried, 1, "worker_lost", "gone")
    winner = fake_success(settings, store, retried)
    store.put_bytes(input_image_key(retried), b"png", "image/png")
    failed = fake_job(settings)
    attempt = fake_attempt(settings, store, failed)
    with session_scope(settings.database_url) as session:
        transitions.fail(session, failed, attempt, "internal_error", "boom")
    running = fake_job(settings)  # attempt 1's leftovers, attempt 2 uploading now
    fake_attempt(settings, store, running)
    with session_scope(settings.database_url) as session:
        transitions.retry_later(session, running, 1, "worker_lost", "gone")
    fake_attempt(settings, store, running)
    ghost = f"video_{uuid.uuid4().hex[:24]}"  # objects of a job with no row
    ghost_keys = {video_key(ghost, 1), input_image_key(ghost)}
    for key in ghost_keys:
        store.put_bytes(key, b"x", "application/octet-stream")
    foreign = f"exports/{uuid.uuid4().hex}.txt"  # not a job's key: never ours to judge
    store.put_bytes(foreign, b"x", "text/plain")
    stale = client.create_multipart_upload(Bucket=bucket, Key=video_key(failed, 9))
    store.put_bytes("probe", b"x", "text/plain")
    old_written = last_modified("probe")  # everything above was written by then

    # Young: written at least a second later (the store's clock), within the max age.
    def later() -> bool:
        store.put_bytes("probe", b"x", "text/plain")
        return last_modified("probe") > old_written

    wait_for(later, 5, "the store's clock to move on", interval=0.1)
    young = fake_job(settings)
    fake_attempt(settings, store, young)
    with session_scope(settings.database_url) as session:
        transitions.retry_later(session, young, 1, "worker_lost", "gone")
    fake_success(settings, store, young)
    fresh = client.create_multipart_upload(Bucket=bucket, Key=video_key(young, 9))
    young_written = min(
        [last_modified(key) for key in attempt_keys(young, 1)]
        + [
            u["Initiated"]
            for u in client.list_multipart_uploads(Bucket=bucket)["Uploads"]
            if u["UploadId"] == fresh["UploadId"]
        ]
    )
    before = {job: keys(store, job) for job in (retried, failed, running, young)}

    now = young_written + timedelta(seconds=MAX_AGE_S)  # the young are exactly max age old
    summary = sweep(settings, store, now=now, state=SweepState())
    expected = (
        set(attempt_keys(retried, 1)) | set(attempt_keys(failed, 1))
        | set(attempt_keys(running, 1)) | ghost_keys
    )  # fmt: skip
    ours = {key for key in summary.orphans if any(j in key for j in (*before, ghost))}
    assert ours == expected
    assert keys(store, retried) == set(attempt_keys(retried, winner)) | {input_image_key(retried)}
    assert keys(store, failed) == set()
    assert keys(store, running) == set(attempt_keys(running, 2))
    assert keys(store, young) == before[young]  # its lost attempt is not old enough yet
    assert keys(store, ghost) == set()
    assert foreign in store.list_keys("exports/")
    listed = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    uploads = {u["UploadId"] for u in listed}
    assert stale["UploadId"] not in uploads and fresh["UploadId"] in uploads
    assert video_key(failed, 9) in summary.aborted_uploads

    again = sweep(settings, store, now=now, state=SweepState())  # sweeping twice is harmless
    assert not {key for key in again.orphans if any(j in key for j in (*before, ghost))}
    assert video_key(failed, 9) not in again.aborted_uploads
    assert keys(store, young) == before[young]

    later_still = sweep(settings, store, now=now + timedelta(seconds=2), state=SweepState())
    assert set(attempt_keys(young, 1)) <= set(later_still.orphans)  # now it is old enough
    assert keys(store, young) == set(attempt_keys(young, 2))
    assert video_key(young, 9) in later_still.aborted_uploads


def test_the_bucket_walk_resumes_where_the_last_pass_stopped(settings, store, monkeypatch):
    import scheduler.sweeper as sweeper

    monkeypatch.setattr(sweeper, "ORPHAN_PAGES_PER_PASS", 1)
    seen: list[str] = []
    real = store.list_page

    def small_pages(prefix="", start_after="", max_keys=1000):
        page, more = real(prefix, start_after, max_keys=2)
        seen.extend(o.key for o in page)
        return page, more

    monkeypatch.setattr(store, "list_page", small_pages)
    everything = store.list_keys("")
    state = SweepState()
    passes = 0
    while passes == 0 or state.cursor:
        summary = sweep(settings, store, state=state)
        assert summary.scanned <= 2
        passes += 1
        assert passes <= len(everything)
    assert passes >= len(everything) // 2 > 1
    assert seen == everything  # each key once, in order, over the passes
