"""The GPU worker through outages of the store and the database: real Celery worker processes,
real Valkey, SeaweedFS and PostgreSQL stopped (``stop()``), frozen (``pause()``, SIGSTOP) or
killed while jobs run, as in a user's incident. Nothing is lost: a rendered job waits for the
store for as long as it owns the job (up to ``storage_outage_max_s``) and for the database with
no limit; a job that does render twice ends with only its winning attempt's objects.

The workers run with a small retry budget (5 tries, back-off 0.5, 1, 2, 2 s: ~5.5 s), and each
outage lasts beyond it (the worker log shows try 6), which the old worker did not survive.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress

import numpy as np
import psutil
import pytest

from fastvideo.entrypoints.video_generator import GenerationResult
from fvb_core.db import transitions
from fvb_core.db.models import Job
from fvb_core.db.session import session_scope
from fvb_core.storage import sidecar_key, video_key
from fvb_tools.localstack import start_postgres
from scheduler.process import run_pass

from .test_worker import (
    SLOW,
    TINY,
    Stack,
    assert_rendered,
    attempt_objects,
    make_stack,
    stop_store,
    wait_for,
)

pytestmark = pytest.mark.timeout(240)

#: make_stack's storage_retry_attempts: the old worker gave up after this many tries.
BUDGET = 5


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> str:
    from fastvideo.testing.tiny_wan import save_tiny_wan

    from .test_worker import SLOW_MODEL

    return str(save_tiny_wan(tmp_path_factory.mktemp("models") / "slow-t2v", SLOW_MODEL))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, valkey_server, s3_server, tiny_t2v, tiny_i2v) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("worker-outages-sqlite")
    stack = make_stack(
        tmp,
        f"sqlite:///{tmp / 'fvb.db'}",
        valkey_server,
        s3_server,
        {"tiny": tiny_t2v, "tiny-i2v": tiny_i2v},
        workers=2,
    )
    yield from stack


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A PostgreSQL of this module's own: the tests stop and freeze it."""
    with start_postgres(tmp_path_factory.mktemp("outage-postgres")) as service:
        yield service


@pytest.fixture(scope="module")
def pg_stack(tmp_path_factory, postgres, valkey_server, s3_server, slow_model) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("worker-outages-postgres")
    yield from make_stack(tmp, postgres.url, valkey_server, s3_server, {"slow": slow_model}, 1)


@contextmanager
def reaper(stack: Stack, heartbeat_timeout_s: float = 2.0) -> Iterator[None]:
    """The scheduler's reaper, every 0.2 s, for the block (requeues and re-dispatches)."""
    settings = stack.settings.model_copy(update={"heartbeat_timeout_s": heartbeat_timeout_s})
    stop = threading.Event()

    def reap() -> None:
        while not stop.wait(0.2):
            try:
                run_pass(settings)
            except Exception:  # the database may be coming back; the next pass retries
                continue

    thread = threading.Thread(target=reap, name="reaper", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)


@contextmanager
def held_in_upload(stack: Stack, job_id: str) -> Iterator[None]:
    """Freeze the store (SIGSTOP) while the job renders; the block runs once its finishing
    part has started uploading attempt 1 (that request hangs until the store is resumed,
    when the block ends)."""
    stack.wait_progress(job_id, 50)
    stack.s3.pause()
    try:
        wait_for(
            lambda: f"job {job_id} attempt 1: uploading" in stack.worker_logs(),
            60,
            "the upload under way",
        )
        yield
    finally:
        stack.s3.resume()


@contextmanager
def frozen(postgres) -> Iterator[None]:
    """Every process of the PostgreSQL server stopped with SIGSTOP. Its backends lead their
    own sessions (postgres calls setsid in each), so the group signal of ``pause()`` would
    freeze the postmaster only: open connections would still be answered."""
    postmaster = psutil.Process(postgres.pid)
    postmaster.send_signal(signal.SIGSTOP)  # first: it forks no backend while we list them
    processes = [postmaster, *postmaster.children(recursive=True)]
    try:
        for process in processes[1:]:
            process.send_signal(signal.SIGSTOP)
        yield
    finally:
        for process in processes:
            with suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGCONT)


def retried_beyond_budget(stack: Stack, what: str) -> bool:
    """The worker log shows try BUDGET + 1 of ``what`` (e.g. "upload of <key>")."""
    return f"{what} failed on try {BUDGET + 1}," in stack.worker_logs()


def pool_child(stack: Stack, job_id: str) -> int:
    return int(stack.row(job_id).worker_id.split(":")[1])


# -- the store -------------------------------------------------------------------------------


def test_store_outage_beyond_the_retry_budget_loses_no_job_and_claims_no_more_than_the_slots(
    stack,
):
    from worker.runner import MAX_FINISHING

    assert stack.settings.storage_retry_attempts == BUDGET
    stop_store(stack)
    try:
        ids = [
            stack.submit("tiny", prompt=f"a cat in the rain, take {i}", seed=i) for i in range(6)
        ]

        def uploads_waiting() -> bool:
            rows = [stack.row(job_id) for job_id in ids]
            assert not [r.id for r in rows if r.status == "failed"], "a job failed"
            running = [r.id for r in rows if r.status == "running"]
            # One upload per worker is retrying (the finishing thread), the other rendered
            # job waits behind it.
            uploading = [
                j
                for j in running
                if retried_beyond_budget(stack, f"job {j} upload of {video_key(j, 1)}")
            ]
            return len(running) == 2 * MAX_FINISHING and len(uploading) == 2

        wait_for(uploads_waiting, 90, "every slot holding an upload past the retry budget")
        # Each worker holds MAX_FINISHING claimed jobs, and its next task waits for a slot
        # before claiming: the other jobs are still queued, never claimed.
        rows = [stack.row(job_id) for job_id in ids]
        running = [r for r in rows if r.status == "running"]
        queued = [r for r in rows if r.status == "queued"]
        assert len(queued) == len(ids) - 2 * MAX_FINISHING
        assert all(r.attempt == 0 for r in queued)
        children = [int(r.worker_id.split(":")[1]) for r in running]
        assert sorted(children.count(c) for c in set(children)) == [MAX_FINISHING] * 2
        wait_for(
            lambda: stack.worker_logs().count("waiting for a finishing slot before claiming") >= 2,
            30,
            "both workers' next task waiting before its claim",
        )
        # The attempts keep heart-beating while they wait for the store.
        beats = {r.id: r.heartbeat_at for r in running}
        wait_for(
            lambda: all(stack.row(j).heartbeat_at > at for j, at in beats.items()), 30, "beats"
        )
    finally:
        stack.s3.start()
    wait_for(lambda: all(stack.row(i).status == "succeeded" for i in ids), 120, "six jobs")
    for job_id in ids:
        assert_rendered(stack, job_id, 1, {**TINY, "seed": ids.index(job_id)})
        assert stack.events(job_id) == [
            (None, "queued", 0),
            ("queued", "running", 1),
            ("running", "succeeded", 1),
        ]


def test_cancel_during_a_long_store_outage_stops_the_upload_and_leaves_nothing(stack):
    stop_store(stack)
    try:
        job_id = stack.submit("tiny", prompt="a cancelled cat")
        wait_for(
            lambda: retried_beyond_budget(stack, f"job {job_id} upload of {video_key(job_id, 1)}"),
            60,
            "an upload past the retry budget",
        )
        with session_scope(stack.url) as session:
            assert transitions.request_cancel(session, job_id) == "running"
        row = stack.wait_status(job_id, "cancelled", "failed", "succeeded", timeout=60)
    finally:
        stack.s3.start()
    assert (row.status, row.error_code, row.attempt) == ("cancelled", "cancelled", 1)
    assert row.output_key is None
    assert stack.keys(job_id) == set()


def test_input_image_download_failing_in_a_store_outage_requeues_the_job(stack):
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (40, 24), (20, 140, 90)).save(png, format="PNG")
    key = f"inputs/{uuid.uuid4().hex}.png"
    stack.client.put_object(Bucket=stack.settings.s3_bucket, Key=key, Body=png.getvalue())
    stop_store(stack)
    try:
        job_id = stack.submit("tiny-i2v", prompt="the leaves start to move", input_image_key=key)
        wait_for(
            lambda: (
                stack.row(job_id).status == "failed"
                or ("running", "queued", 1) in stack.events(job_id)
            ),
            60,
            "the job back in the queue",
        )
        row = stack.row(job_id)
        assert (row.status, row.attempt, row.error_code) == ("queued", 1, "storage_unavailable")
        assert f"download of {key}" in row.error_message
        assert f"gave up after {BUDGET} tries" in row.error_message
    finally:
        stack.s3.start()
    with reaper(stack, heartbeat_timeout_s=60):  # re-dispatches the requeued job
        stack.wait_status(job_id, "succeeded", "failed", timeout=60)
    assert_rendered(stack, job_id, 2, {**TINY, "seed": 1234})
    assert stack.events(job_id) == [
        (None, "queued", 0),
        ("queued", "running", 1),
        ("running", "queued", 1),
        ("queued", "running", 2),
        ("running", "succeeded", 2),
    ]


def test_store_outage_past_the_limit_requeues_the_job_or_fails_its_last_attempt(stack):
    """In-process runner (no dispatch) with storage_outage_max_s=1.5 and an engine that returns
    frames: the upload gives up after the outage limit, not after the retry budget's tries."""
    from worker.runner import JobRunner

    class Engine:
        def generate_video(self, prompt, **kwargs):
            frames = np.random.default_rng(0).random((5, 32, 32, 3), dtype=np.float32)
            return GenerationResult(
                frames=frames,
                video_path=None,
                seed=7,
                fps=8,
                num_frames=5,
                height=32,
                width=32,
                stage_timings={"denoising_stage": 0.1},
            )

    settings = stack.settings.model_copy(
        update={"storage_outage_max_s": 1.5, "storage_retry_attempts": 1}
    )
    ids = {}
    with session_scope(stack.url) as session:
        for max_attempts in (3, 1):
            job = Job(tenant="acme", model="tiny", params={"prompt": "a cat", **TINY})
            job.max_attempts = max_attempts
            ids[max_attempts] = transitions.create_job(session, job).id
    runner = JobRunner(settings, worker_id="test:0:cpu")
    runner.pipelines.get = lambda model: Engine()
    stop_store(stack)
    try:
        assert runner.run(ids[3]) == "rendered"
        assert runner.run(ids[1]) == "rendered"
        runner.drain()  # waits for both finishing parts
    finally:
        stack.s3.start()
    try:
        requeued, failed = stack.row(ids[3]), stack.row(ids[1])
        assert (requeued.status, requeued.attempt, requeued.error_code) == (
            "queued",
            1,
            "storage_unavailable",
        )
        assert "stayed unreachable" in requeued.error_message
        assert stack.events(ids[3])[-1] == ("running", "queued", 1)
        assert (failed.status, failed.error_code) == ("failed", "storage_unavailable")
        assert "after 1 attempts" in failed.error_message
        for job_id in ids.values():
            assert stack.keys(job_id) == set()
    finally:
        with session_scope(stack.url) as session:  # nobody is to render it later
            transitions.request_cancel(session, ids[3])


# -- the database ----------------------------------------------------------------------------


def test_database_down_while_recording_is_waited_out_and_the_job_succeeds_once(pg_stack, postgres):
    stack = pg_stack
    job_id = stack.submit("slow", prompt="a lighthouse at dusk")
    with held_in_upload(stack, job_id):
        postgres.stop()
    try:
        wait_for(
            lambda: retried_beyond_budget(stack, f"job {job_id} recording success"),
            60,
            "recording retried past the budget",
        )
        assert sidecar_key(job_id, 1) in stack.keys(job_id)  # uploaded, waiting to record
    finally:
        postgres.start()
    stack.wait_status(job_id, "succeeded", "failed", timeout=60)
    assert_rendered(stack, job_id, 1, {**SLOW, "seed": 1234})
    assert stack.events(job_id) == [
        (None, "queued", 0),
        ("queued", "running", 1),
        ("running", "succeeded", 1),
    ]


def test_stale_attempt_that_lost_while_the_database_was_down_deletes_its_objects(
    pg_stack, postgres
):
    """The database stays down past the retry budget while a job records its success; it
    comes back while the worker's pool child is frozen, and the reaper requeues the job
    first. The attempt's next try finds it lost and deletes its four objects; attempt 2 wins."""
    stack = pg_stack
    job_id = stack.submit("slow", prompt="a sailing boat in fog")
    stack.wait_progress(job_id, 1)
    child = pool_child(stack, job_id)
    with held_in_upload(stack, job_id):
        postgres.stop()
    try:
        wait_for(
            lambda: retried_beyond_budget(stack, f"job {job_id} recording success"),
            60,
            "recording retried past the budget",
        )
        os.kill(child, signal.SIGSTOP)
    finally:
        postgres.start()
    try:
        with reaper(stack):
            wait_for(lambda: stack.row(job_id).status == "queued", 30, "requeued")
    finally:
        os.kill(child, signal.SIGCONT)
    with reaper(stack, heartbeat_timeout_s=60):
        stack.wait_status(job_id, "succeeded", "failed", timeout=90)
    assert_rendered(stack, job_id, 2, {**SLOW, "seed": 1234})
    assert (
        f"job {job_id} attempt 1: superseded before recording success; deleted its objects"
        in stack.worker_logs()
    )
    assert stack.events(job_id) == [
        (None, "queued", 0),
        ("queued", "running", 1),
        ("running", "queued", 1),
        ("queued", "running", 2),
        ("running", "succeeded", 2),
    ]


def test_requeued_job_whose_first_attempt_left_objects_ends_with_only_the_winners(
    pg_stack, postgres
):
    """Attempt 1 uploads everything, then its database freezes before it can record, and its
    process is killed (-9): its objects are in the store, unrecorded. The reaper requeues the
    job; attempt 2 removes attempt 1's objects when it claims, and wins."""
    stack = pg_stack
    job_id = stack.submit("slow", prompt="a train crossing a bridge")
    stack.wait_progress(job_id, 1)
    child = pool_child(stack, job_id)
    with ExitStack() as database:
        with held_in_upload(stack, job_id):
            # The record (and the heartbeat) hang on the frozen database.
            database.enter_context(frozen(postgres))
        wait_for(lambda: sidecar_key(job_id, 1) in stack.keys(job_id), 60, "attempt 1 stored")
        assert stack.keys(job_id) == attempt_objects(job_id, 1)
        os.kill(child, signal.SIGKILL)
    with reaper(stack):
        stack.wait_status(job_id, "succeeded", "failed", timeout=120)
    assert_rendered(stack, job_id, 2, {**SLOW, "seed": 1234})  # attempt 2's objects only
    assert stack.keys(job_id) == attempt_objects(job_id, 2)
    removed = ", ".join(sorted(attempt_objects(job_id, 1)))
    assert (
        f"job {job_id} attempt 2: removed 4 object(s) of earlier attempts: {removed}"
        in stack.worker_logs()
    )
    assert stack.events(job_id) == [
        (None, "queued", 0),
        ("queued", "running", 1),
        ("running", "queued", 1),
        ("queued", "running", 2),
        ("running", "succeeded", 2),
    ]


def test_a_cancel_that_lands_as_the_job_goes_back_to_the_queue_cancels_it(stack):
    """The cancel flag was set while the attempt ran and the attempt did not see it before it
    gave the job back: retry_later's one statement ends it cancelled (queued, no one would
    ever claim it)."""
    with session_scope(stack.url) as session:
        job_id = transitions.create_job(
            session, Job(tenant="acme", model="tiny", params={"prompt": "a cat", **TINY})
        ).id
    with session_scope(stack.url) as session:
        assert transitions.claim(session, job_id, "test:0:cpu").attempt == 1
        assert transitions.request_cancel(session, job_id) == "running"
        assert transitions.retry_later(session, job_id, 1, "storage_unavailable", "down")
    with session_scope(stack.url) as session:
        assert transitions.claim(session, job_id, "test:0:cpu") is None
        assert not transitions.cancel_if_requested(session, job_id)
    row = stack.row(job_id)
    assert (row.status, row.error_code, row.attempt) == ("cancelled", "cancelled", 1)
    assert row.finished_at is not None
    assert stack.events(job_id)[-1] == ("running", "cancelled", 1)
