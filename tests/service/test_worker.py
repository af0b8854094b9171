"""The GPU worker end to end: real Celery worker processes (``python -m worker.main --device
cpu``), real Valkey, S3 (SeaweedFS) and databases, tiny random-weight Wan models.
Outages of the store and the database are in ``test_worker_outages.py``.

Jobs are inserted with ``transitions.create_job``, then released and published as the
scheduler does. Two workers serve the SQLite tests; one more, on its own pool, serves the Postgres
test. "Slow" jobs use a wider DiT with classifier-free guidance (~0.1 s a step on one CPU
thread), so there is time to kill, cancel or take the store away in the middle of one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import psutil
import pytest
import redis
import torch
from PIL import Image
from sqlalchemy import create_engine, select, text

from fastvideo.pipelines.pipeline_batch_info import StepProgress
from fastvideo.testing.tiny_wan import TinyWanConfig, save_tiny_wan
from fvb_core.db import transitions
from fvb_core.db.migrate import upgrade
from fvb_core.db.models import Job, JobEvent
from fvb_core.db.session import session_scope
from fvb_core.models_config import ServedModel
from fvb_core.queue import RENDER_TASK, make_celery, publish, queue_for_pool
from fvb_core.settings import Settings
from fvb_core.storage import (
    VideoStore,
    sidecar_key,
    spritesheet_key,
    thumbnail_key,
    video_key,
)
from fvb_tools.localstack.process import die_with_parent

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(240)

#: ~0.1 s per denoising step on one CPU thread with guidance (two DiT passes per step).
SLOW_MODEL = TinyWanConfig(num_attention_heads=8, attention_head_dim=64, ffn_dim=2048)
SLOW_STEPS = 40
TINY = dict(width=32, height=32, num_frames=5, num_inference_steps=2, guidance_scale=1.0)
SLOW = dict(width=64, height=64, num_frames=33, num_inference_steps=SLOW_STEPS, guidance_scale=5.0)


# -- worker processes ------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[int]:
        return [child.pid for child in psutil.Process(self.pid).children(recursive=True)]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)  # warm shutdown: finish uploads, then exit
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait()


def settings_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FVB_")}
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            # Lists and tuples as JSON, the way pydantic-settings reads them from the env.
            env[f"FVB_{name.upper()}"] = (
                json.dumps(value) if isinstance(value, list | dict) else str(value)
            )
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


def start_workers(
    settings: Settings,
    log_dir: Path,
    count: int,
    name: str = "",
    device_args: tuple[str, ...] = ("--device", "cpu"),
) -> list[WorkerProcess]:
    """``count`` real Celery workers (``python -m worker.main``) of the settings' pool; by
    default on the CPU, ``device_args=("--gpus", "0,1")`` gives each one that GPU group."""
    workers = []
    for index in range(count):
        log_path = log_dir / f"worker-{settings.worker_pool}-{name or index}.log"
        with open(log_path, "wb") as log_file:
            popen = subprocess.Popen(
                [sys.executable, "-m", "worker.main", *device_args],
                cwd=REPO,
                env=settings_env(settings),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),  # a killed test run takes its workers along
            )
        workers.append(WorkerProcess(popen, log_path))
    try:
        for worker in workers:
            wait_for(
                lambda w=worker: " ready." in w.log() or w.popen.poll() is not None, timeout=60
            )
            assert worker.popen.poll() is None, worker.log()
    except BaseException:
        stop_workers(workers)
        raise
    return workers


def stop_workers(workers: list[WorkerProcess]) -> None:
    for worker in workers:  # all at once: each waits ~1 s for its pool child to exit
        if worker.popen.poll() is None:
            worker.popen.send_signal(signal.SIGTERM)
    for worker in workers:
        worker.stop()


# -- the stack -------------------------------------------------------------------------------


@dataclass
class Stack:
    settings: Settings
    workers: list[WorkerProcess]
    s3: Any  # S3Service
    client: Any = field(repr=False)  # boto3 S3 client
    device: str = "cpu"  # where the workers render: "cpu" or "cuda"

    @property
    def url(self) -> str:
        return self.settings.database_url

    def submit(self, model: str, prompt: str = "a cat", **overrides: Any) -> str:
        params = {
            "prompt": prompt,
            "negative_prompt": None,
            "seed": 1234,
            "fps": 8,
            "metadata": {"test": True},
            **(SLOW if model == "slow" else TINY),
            **overrides,
        }
        pool = self.settings.worker_pool
        with session_scope(self.url) as session:
            job = transitions.create_job(
                session, Job(tenant="acme", model=model, pool=pool, params=params, max_attempts=3)
            )
            # What the scheduler does for it: mark it released, then publish.
            transitions.release(session, [job.id], queue_for_pool(pool))
        publish(self.settings, job.id, pool)
        return job.id

    def row(self, job_id: str) -> Job:
        with session_scope(self.url) as session:
            return session.get(Job, job_id)

    def events(self, job_id: str) -> list[tuple]:
        """The job's state changes (the scheduler's release marks, queued -> queued, apart)."""
        with session_scope(self.url) as session:
            rows = session.execute(
                select(JobEvent.from_status, JobEvent.to_status, JobEvent.attempt)
                .where(
                    JobEvent.job_id == job_id,
                    JobEvent.from_status.is_distinct_from(JobEvent.to_status),
                )
                .order_by(JobEvent.id)
            ).all()
        return [tuple(r) for r in rows]

    def wait_status(self, job_id: str, *statuses: str, timeout: float = 60) -> Job:
        wait_for(lambda: self.row(job_id).status in statuses, timeout, what=f"{job_id} {statuses}")
        return self.row(job_id)

    def wait_progress(self, job_id: str, at_least: int, timeout: float = 60) -> Job:
        def reached() -> bool:
            row = self.row(job_id)
            assert row.status in ("queued", "running"), (row.status, row.error_message)
            return row.status == "running" and row.progress >= at_least

        wait_for(reached, timeout, what=f"{job_id} progress {at_least}")
        return self.row(job_id)

    def keys(self, job_id: str) -> set[str]:
        store = VideoStore(self.settings)
        return set(store.list_keys(f"videos/{job_id}/"))

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.settings.s3_bucket, Key=key)["Body"].read()

    def worker_logs(self) -> str:
        return "\n".join(worker.log() for worker in self.workers)


def wait_for(check: Callable[[], bool], timeout: float, what: str = "", interval=0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or check}")
        time.sleep(interval)


def worker_settings(database_url: str, valkey, s3, pool: str, config: Path, **extra) -> Settings:
    """Settings of test workers on their own pool and bucket of the shared servers."""
    return Settings(
        database_url=database_url,
        broker_url=valkey.url,
        s3_endpoint_url=s3.endpoint_url,
        s3_access_key=s3.access_key,
        s3_secret_key=s3.secret_key,
        s3_bucket=f"fvb-{pool}",
        models_config=config,
        worker_pool=pool,
        heartbeat_interval_s=0.2,
        **extra,
    )


def make_stack(
    tmp: Path, database_url: str, valkey, s3, models: dict[str, str], workers: int
) -> Iterator[Stack]:
    pool = f"wt{uuid.uuid4().hex[:8]}"  # our own queue on the shared Valkey
    config = tmp / "models.toml"
    config.write_text(
        "".join(
            f'[models."{name}"]\npath = "{path}"\npool = "{pool}"\n'
            for name, path in models.items()
        )
    )
    settings = worker_settings(
        database_url,
        valkey,
        s3,
        pool,
        config,
        # Every step's progress is written, so the cancel test can tell which step it was.
        progress_min_interval_s=0.0,
        # Back-off 0.5, 1, 2, 2 s: the store may be down ~5.5 s before a job fails.
        storage_retry_attempts=5,
        storage_retry_base_s=0.5,
        storage_retry_max_s=2.0,
        # Every model of the module stays loaded, so the load counts below are exact.
        pipeline_cache_size=3,
    )
    upgrade(database_url)
    client = s3.client()
    client.create_bucket(Bucket=settings.s3_bucket)
    stack = Stack(
        settings=settings, workers=start_workers(settings, tmp, workers), s3=s3, client=client
    )
    try:
        yield stack
    finally:
        stop_workers(stack.workers)


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> str:
    return str(save_tiny_wan(tmp_path_factory.mktemp("models") / "slow-t2v", SLOW_MODEL))


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory, valkey_server, s3_server, tiny_t2v, tiny_i2v, slow_model
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("worker-sqlite")
    yield from make_stack(
        tmp,
        f"sqlite:///{tmp / 'fvb.db'}",
        valkey_server,
        s3_server,
        {"tiny": tiny_t2v, "tiny-i2v": tiny_i2v, "slow": slow_model},
        workers=2,
    )


def decode_frames(data: bytes) -> list[np.ndarray]:
    """The frames of an mp4, decoded with PyAV, as (H, W, 3) uint8 arrays."""
    with av.open(io.BytesIO(data)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def decode(data: bytes) -> tuple[int, int, int]:
    """(frames, width, height) of an mp4, decoded with PyAV."""
    frames = decode_frames(data)
    return len(frames), frames[0].shape[1], frames[0].shape[0]


def attempt_objects(job_id: str, attempt: int) -> set[str]:
    """The objects one attempt leaves: the video, its two previews and the sidecar."""
    return {
        video_key(job_id, attempt),
        thumbnail_key(job_id, attempt),
        spritesheet_key(job_id, attempt),
        sidecar_key(job_id, attempt),
    }


def image(data: bytes, fmt: str) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == fmt
        return np.asarray(img.convert("RGB"))


def similar(a: np.ndarray, b: np.ndarray) -> bool:
    """Two lossy copies of one picture: same shape, mean absolute difference small."""
    return a.shape == b.shape and float(np.abs(a.astype(float) - b.astype(float)).mean()) < 12


def assert_previews(stack: Stack, job_id: str, attempt: int, video: bytes) -> None:
    """The thumbnail is the first frame as WebP; the spritesheet a JPEG grid of evenly spaced
    frames, small tiles; the sidecar describes both (key, bytes, sha256, layout)."""
    frames = decode_frames(video)
    height, width = frames[0].shape[:2]
    sidecar = json.loads(stack.get(sidecar_key(job_id, attempt)))
    for name, key, content_type in (
        ("thumbnail", thumbnail_key(job_id, attempt), "image/webp"),
        ("spritesheet", spritesheet_key(job_id, attempt), "image/jpeg"),
    ):
        data = stack.get(key)
        entry = sidecar[name]
        assert (entry["key"], entry["bytes"], entry["content_type"]) == (
            key,
            len(data),
            content_type,
        )
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        head = stack.client.head_object(Bucket=stack.settings.s3_bucket, Key=key)
        assert head["ContentType"] == content_type

    thumbnail = image(stack.get(thumbnail_key(job_id, attempt)), "WEBP")
    scale = min(1.0, 640 / max(width, height))
    assert thumbnail.shape == (round(height * scale), round(width * scale), 3)
    assert (sidecar["thumbnail"]["width"], sidecar["thumbnail"]["height"]) == thumbnail.shape[1::-1]
    if scale == 1.0:
        assert similar(thumbnail, frames[0])

    sheet = sidecar["spritesheet"]
    grid = image(stack.get(spritesheet_key(job_id, attempt)), "JPEG")
    count = min(10, len(frames))
    assert len(sheet["frames"]) == count
    assert sheet["frames"][0] == 0 and sheet["frames"][-1] == len(frames) - 1
    gaps = np.diff(sheet["frames"])
    assert gaps.min() >= 1 and gaps.max() - gaps.min() <= 1, "evenly spaced"
    assert sheet["columns"] <= 5 and sheet["rows"] == -(-count // sheet["columns"])
    tile_w, tile_h = sheet["tile_width"], sheet["tile_height"]
    assert max(tile_w, tile_h) <= 160 and abs(tile_w / tile_h - width / height) < 0.05
    assert grid.shape == (sheet["rows"] * tile_h, sheet["columns"] * tile_w, 3)
    assert (sheet["width"], sheet["height"]) == grid.shape[1::-1]
    if (tile_w, tile_h) == (width, height):  # unscaled tiles are the frames themselves
        for n, index in enumerate(sheet["frames"]):
            row, column = divmod(n, sheet["columns"])
            tile = grid[row * tile_h : (row + 1) * tile_h, column * tile_w : (column + 1) * tile_w]
            assert similar(tile, frames[index]), n


def assert_rendered(stack: Stack, job_id: str, attempt: int, params: dict[str, Any]) -> None:
    row = stack.row(job_id)
    assert (row.status, row.progress, row.attempt) == ("succeeded", 100, attempt)
    assert row.error_code is None
    assert row.output_key == video_key(job_id, attempt)
    assert stack.keys(job_id) == attempt_objects(job_id, attempt)
    data = stack.get(row.output_key)
    assert hashlib.sha256(data).hexdigest() == row.output_sha256
    assert len(data) == row.output_bytes
    assert decode(data) == (params["num_frames"], params["width"], params["height"])
    sidecar = json.loads(stack.get(sidecar_key(job_id, attempt)))
    assert sidecar["params"] == row.params
    assert sidecar["seed"] == params["seed"]
    assert sidecar["worker_id"] == row.worker_id
    assert sidecar["video"]["sha256"] == row.output_sha256
    assert {"generate", "denoising_stage", "mp4_encode", "previews", "upload"} <= set(
        sidecar["timings"]
    )
    assert set(row.stage_timings) >= {"generate", "mp4_encode", "upload"}
    assert_previews(stack, job_id, attempt, data)


def stop_store(stack: Stack) -> None:
    # weed sometimes takes its whole 10 s grace to stop; the retry budget is shorter.
    stack.s3.stop(grace=1.0)


def worker_of(stack: Stack, job_id: str) -> tuple[WorkerProcess, int]:
    """The worker process whose pool child claimed the job, and that child's pid."""
    child = int(stack.row(job_id).worker_id.split(":")[1])
    for worker in stack.workers:
        if child in worker.children():
            return worker, child
    raise AssertionError(f"{child} is not a child of any worker")


# -- tests -----------------------------------------------------------------------------------


def test_one_job_renders_uploads_and_records_its_checksum(stack):
    job_id = stack.submit("tiny", width=64, height=48, num_frames=9, num_inference_steps=4, seed=7)
    stack.wait_status(job_id, "succeeded", "failed", "cancelled", timeout=90)
    assert_rendered(stack, job_id, 1, {"num_frames": 9, "width": 64, "height": 48, "seed": 7})
    assert stack.events(job_id) == [
        (None, "queued", 0),
        ("queued", "running", 1),
        ("running", "succeeded", 1),
    ]
    worker, child = worker_of(stack, job_id)  # a pool child of one of our workers ran it
    # Only that child loaded the engine; the Celery parent never imported torch.
    assert "libtorch" in Path(f"/proc/{child}/maps").read_text()
    assert "libtorch" not in Path(f"/proc/{worker.pid}/maps").read_text()


def test_previews_of_a_longer_video_sample_ten_evenly_spaced_frames_in_small_tiles(stack):
    params = dict(width=320, height=176, num_frames=17, num_inference_steps=2, seed=11)
    job_id = stack.submit("tiny", prompt="a kite over a beach", **params)
    stack.wait_status(job_id, "succeeded", "failed", "cancelled", timeout=90)
    assert_rendered(stack, job_id, 1, params)  # previews included
    sidecar = json.loads(stack.get(sidecar_key(job_id, 1)))
    sheet = sidecar["spritesheet"]
    assert sheet["frames"] == [0, 1, 3, 5, 7, 8, 10, 12, 14, 16]
    assert (sheet["columns"], sheet["rows"]) == (5, 2)
    assert (sheet["tile_width"], sheet["tile_height"]) == (160, 88)  # scaled down by half
    assert (sidecar["thumbnail"]["width"], sidecar["thumbnail"]["height"]) == (320, 176)
    frames = decode_frames(stack.get(video_key(job_id, 1)))
    thumbnail = image(stack.get(thumbnail_key(job_id, 1)), "WEBP")
    assert similar(thumbnail, frames[0])
    # Each tile is its frame, scaled down.
    grid = image(stack.get(spritesheet_key(job_id, 1)), "JPEG")
    for n, index in enumerate(sheet["frames"]):
        row, column = divmod(n, 5)
        tile = grid[row * 88 : (row + 1) * 88, column * 160 : (column + 1) * 160]
        small = np.asarray(Image.fromarray(frames[index]).resize((160, 88), Image.BILINEAR))
        assert similar(tile, small), n
    assert len(stack.get(spritesheet_key(job_id, 1))) < 200_000


def test_twenty_jobs_on_two_workers_each_succeed_once_with_pipelines_loaded_once(stack):
    ids = [stack.submit("tiny", prompt=f"a cat, take {i}", seed=i) for i in range(20)]
    wait_for(
        lambda: all(stack.row(i).status in ("succeeded", "failed") for i in ids), 120, "20 jobs"
    )
    for job_id in ids:
        row = stack.row(job_id)
        assert (row.status, row.attempt, row.progress) == ("succeeded", 1, 100), row.error_message
        assert stack.keys(job_id) == attempt_objects(job_id, 1)
        assert stack.events(job_id) == [
            (None, "queued", 0),
            ("queued", "running", 1),
            ("running", "succeeded", 1),
        ]
    children = {int(stack.row(i).worker_id.split(":")[1]) for i in ids}
    parents = {worker_of(stack, i)[0].pid for i in ids}
    assert parents == {w.pid for w in stack.workers}, "both workers should have taken jobs"
    logs = stack.worker_logs()
    for child in children:
        loads = [
            line
            for line in logs.splitlines()
            if "pipeline loaded: model=tiny " in line and f" pid={child} " in line
        ]
        assert len(loads) == 1, loads


def test_cancel_queued_and_running_jobs_stops_within_two_steps_and_leaves_no_object(stack):
    running = [stack.submit("slow", prompt=f"waves on a rocky shore {i}") for i in range(2)]
    wait_for(
        lambda: all(
            stack.row(j).status == "running" and stack.row(j).progress >= 1 for j in running
        ),
        60,
        "both slow jobs denoising",
    )
    # Both workers are busy: this one stays queued.
    queued = stack.submit("tiny", prompt="a queued cat")
    with session_scope(stack.url) as session:
        assert transitions.request_cancel(session, queued) == "cancelled"

    steps_of = {s * 95 // SLOW_STEPS: s for s in range(SLOW_STEPS + 1)}
    asked_at: dict[str, int] = {}

    def cancel_mid_denoising() -> bool:
        for job_id in set(running) - set(asked_at):
            if stack.row(job_id).progress < 10:
                continue
            with session_scope(stack.url) as session:
                assert transitions.request_cancel(session, job_id) == "running"
                # Same transaction: the worker cannot write a newer step before we commit.
                asked_at[job_id] = session.execute(
                    select(Job.progress).where(Job.id == job_id)
                ).scalar_one()
        return len(asked_at) == len(running)

    wait_for(cancel_mid_denoising, 60, "both jobs at 10% and cancelled", interval=0.02)
    for job_id in running:
        row = stack.wait_status(job_id, "cancelled", "succeeded", "failed", timeout=30)
        assert (row.status, row.error_code) == ("cancelled", "cancelled")
        asked_step, last_step = steps_of[asked_at[job_id]], steps_of[row.progress]
        assert asked_step < SLOW_STEPS - 2, "the cancel should land mid-denoising"
        assert 0 <= last_step - asked_step <= 2, (asked_step, last_step)
        assert row.output_key is None
        assert stack.events(job_id) == [
            (None, "queued", 0),
            ("queued", "running", 1),
            ("running", "cancelled", 1),
        ]
    # The queued job's message reaches a worker that is free again, which leaves it alone.
    wait_for(lambda: f"job {queued}: not claimable" in stack.worker_logs(), 30, "skip queued")
    row = stack.row(queued)
    assert (row.status, row.attempt) == ("cancelled", 0)
    assert stack.events(queued) == [(None, "queued", 0), ("queued", "cancelled", 0)]
    for job_id in [*running, queued]:
        assert stack.keys(job_id) == set()


def test_image_to_video_job_reads_its_input_image_from_the_store(stack):
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (40, 24), (200, 40, 90)).save(png, format="PNG")
    key = f"inputs/{uuid.uuid4().hex}.png"
    stack.client.put_object(Bucket=stack.settings.s3_bucket, Key=key, Body=png.getvalue())
    job_id = stack.submit("tiny-i2v", prompt="the panda starts to move", input_image_key=key)
    stack.wait_status(job_id, "succeeded", "failed", "cancelled", timeout=60)
    assert_rendered(stack, job_id, 1, {**TINY, "seed": 1234})
    sidecar = json.loads(stack.get(sidecar_key(job_id, 1)))
    assert sidecar["params"]["input_image_key"] == key


def test_permanent_errors_fail_the_job_with_a_clear_code(stack):
    jobs = {
        "model_load_failed": stack.submit("not-served"),
        "invalid_params": stack.submit("tiny", width=40),
        # An image-to-video job whose input image is not in the store.
        "invalid_params ": stack.submit("tiny-i2v", input_image_key="inputs/missing.png"),
    }
    messages = {
        "model_load_failed": "not-served",
        "invalid_params": "width=40 must be a multiple of 16",
        "invalid_params ": "does not exist",
    }
    for code, job_id in jobs.items():
        row = stack.wait_status(job_id, "succeeded", "failed", "cancelled", timeout=60)
        assert (row.status, row.error_code, row.attempt) == ("failed", code.strip(), 1)
        assert messages[code] in row.error_message
        assert stack.keys(job_id) == set()
        assert [e[1] for e in stack.events(job_id)] == ["queued", "running", "failed"]


@contextmanager
def task_events(settings: Settings) -> Iterator[list[dict[str, Any]]]:
    """Every Celery event on the broker while the block runs, as Flower sees them: a real
    ``celery_app.events.Receiver`` on its own connection, consuming before the block starts."""
    app = make_celery(settings, name="fvb-events-test")
    events: list[dict[str, Any]] = []
    consuming = threading.Event()
    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": events.append})
        receiver.on_consume_ready = lambda *args, **kwargs: consuming.set()
        thread = threading.Thread(
            target=receiver.capture, kwargs={"wakeup": False}, name="events", daemon=True
        )
        thread.start()
        try:
            assert consuming.wait(30), "the event receiver did not start consuming"
            yield events
        finally:
            receiver.should_stop = True
            thread.join(timeout=30)
            assert not thread.is_alive()


def task_of(events: list[dict[str, Any]], job_id: str) -> list[dict[str, Any]]:
    """The events of the render task(s) whose arguments name ``job_id``, in arrival order."""
    ids = {e["uuid"] for e in list(events) if e.get("args") and job_id in str(e["args"])}
    return [e for e in list(events) if e.get("uuid") in ids]


def test_task_events_show_a_failed_render_as_a_failure_with_its_error_code(stack):
    """Flower's view: the render task of a job that fails for good ends as task-failed, the
    exception naming the code; a rendered job's task succeeds. The failed task's message is
    acknowledged (not left for redelivery)."""
    with task_events(stack.settings) as events:
        failed = stack.submit("not-served", prompt="a model nobody serves")
        done = stack.submit("tiny", prompt="a cat on a skateboard")

        def finished(job_id: str, kind: str) -> bool:
            return any(e["type"] == kind for e in task_of(events, job_id))

        wait_for(
            lambda: finished(failed, "task-failed") and finished(done, "task-succeeded"),
            60,
            "task-failed and task-succeeded events",
        )
    failure = task_of(events, failed)
    kinds = [e["type"] for e in failure]
    # task-sent comes from the dispatcher, the rest from the worker, in this order.
    assert sorted(kinds) == ["task-failed", "task-received", "task-sent", "task-started"]
    worker_kinds = [kind for kind in kinds if kind != "task-sent"]
    assert worker_kinds == ["task-received", "task-started", "task-failed"], kinds
    assert len({e["uuid"] for e in failure}) == 1
    (event,) = [e for e in failure if e["type"] == "task-failed"]
    assert event["exception"].startswith("RenderFailed('model_load_failed', ")
    assert "not-served" in event["exception"]
    row = stack.row(failed)
    assert (row.status, row.error_code) == ("failed", "model_load_failed")

    success = task_of(events, done)
    assert [e["type"] for e in success if e["type"].startswith("task-")][-1] == "task-succeeded"
    (event,) = [e for e in success if e["type"] == "task-succeeded"]
    assert event["result"] == "'rendered'"
    stack.wait_status(done, "succeeded", "failed", timeout=30)
    assert_rendered(stack, done, 1, {**TINY, "seed": 1234})

    # Acknowledged on failure: the message is neither unacknowledged nor back in the queue.
    broker = redis.Redis.from_url(stack.settings.broker_url)
    task_id = failure[0]["uuid"]
    wait_for(lambda: not any(task_id in v.decode() for v in broker.hvals("unacked")), 30, "the ack")
    queue = queue_for_pool(stack.settings.worker_pool)
    for key in broker.scan_iter(match=f"{queue}*"):
        if broker.type(key) == b"list":
            assert not any(task_id in m.decode() for m in broker.lrange(key, 0, -1))
    # Celery logs the expected failure on one line, without a traceback.
    line = next(
        line for line in stack.worker_logs().splitlines() if task_id in line and "raised" in line
    )
    assert "raised expected: RenderFailed('model_load_failed'" in line, line


def test_render_task_declares_its_failure_and_acknowledges_it():
    from worker.celery_app import create_app
    from worker.failures import RenderFailed

    task = create_app(Settings(broker_url="redis://127.0.0.1:1/0")).tasks[RENDER_TASK]
    assert task.throws == (RenderFailed,)
    assert (task.acks_late, task.acks_on_failure_or_timeout, task.reject_on_worker_lost) == (
        True,
        True,
        True,
    )
    assert task.app.conf.worker_send_task_events and task.app.conf.task_send_sent_event


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (lambda: torch.cuda.OutOfMemoryError("CUDA out of memory"), "out_of_memory", "memory"),
        (lambda: KeyError("latents"), "internal_error", "KeyError: 'latents'"),
        (lambda: ValueError("num_frames too large"), "invalid_params", "num_frames too large"),
    ],
)
def test_engine_errors_map_to_error_codes(stack, error, code, message):
    """In-process runner (no dispatch, so no worker takes the job) with an engine that raises:
    the errors a CPU test cannot provoke for real, such as CUDA running out of memory. The
    runner raises RenderFailed with the code (the Celery task ends as a FAILURE)."""
    from worker.failures import RenderFailed
    from worker.runner import JobRunner

    class Engine:
        def generate_video(self, prompt, **kwargs):
            kwargs["callback"](StepProgress(1, 2, 999.0, 0.01))
            raise error()

    with session_scope(stack.url) as session:
        job_id = transitions.create_job(
            session, Job(tenant="acme", model="tiny", params={"prompt": "a cat", **TINY})
        ).id
    runner = JobRunner(stack.settings, worker_id="test:0:cpu")
    runner.pipelines.get = lambda model: Engine()
    with pytest.raises(RenderFailed) as failure:
        runner.run(job_id)
    assert (failure.value.code, str(failure.value)) == (code, f"{code}: {failure.value.message}")
    row = stack.row(job_id)
    assert (row.status, row.error_code, row.progress) == ("failed", code, 47)
    assert message in row.error_message
    runner.drain()


def test_pipeline_cache_loads_each_model_once_and_drops_the_least_recently_used(tiny_t2v, tiny_i2v):
    from worker.pipeline_cache import PipelineCache

    cache = PipelineCache(size=2, device="cpu")
    t2v, i2v, t2v_b = (
        ServedModel(name=name, path=Path(path))
        for name, path in (("t2v", tiny_t2v), ("i2v", tiny_i2v), ("t2v-b", tiny_t2v))
    )
    first = cache.get(t2v)
    assert cache.get(t2v) is first
    cache.get(i2v)
    cache.get(t2v)  # t2v is now the most recently used
    cache.get(t2v_b)  # over the size: i2v goes
    assert ("t2v" in cache, "i2v" in cache, "t2v-b" in cache) == (True, False, True)
    assert cache.get(t2v) is first
    cache.get(i2v)
    assert dict(cache.loads) == {"t2v": 1, "i2v": 2, "t2v-b": 1}


def test_killed_child_is_requeued_and_finishes_as_attempt_two(stack):
    from scheduler.process import run_pass

    job_id = stack.submit("slow", prompt="a drone shot over a city at night")
    stack.wait_progress(job_id, 10)
    worker, child = worker_of(stack, job_id)
    os.kill(child, signal.SIGKILL)

    reaper = stack.settings.model_copy(update={"heartbeat_timeout_s": 2.0})
    stop = threading.Event()

    def reap() -> None:
        while not stop.wait(0.2):
            run_pass(reaper)

    thread = threading.Thread(target=reap, daemon=True)
    thread.start()
    try:
        stack.wait_status(job_id, "succeeded", "failed", timeout=90)
    finally:
        stop.set()
        thread.join()
    assert_rendered(stack, job_id, 2, {**SLOW, "seed": 1234})
    assert stack.events(job_id) == [
        (None, "queued", 0),
        ("queued", "running", 1),
        ("running", "queued", 1),
        ("queued", "running", 2),
        ("running", "succeeded", 2),
    ]
    assert worker.popen.poll() is None, "the Celery parent survives and replaces its child"
    # The redelivered message (or the reaper's) found the job owned or done and did nothing.
    wait_for(lambda: f"job {job_id}: not claimable" in stack.worker_logs(), 30, "skip")

    # The stale attempt 1 is fenced out: every write it could make matches no row.
    def snapshot() -> dict[str, Any]:
        job = stack.row(job_id)
        return {c: getattr(job, c) for c in Job.__table__.columns.keys()}  # noqa: SIM118

    before, events = snapshot(), stack.events(job_id)
    with session_scope(stack.url) as session:
        assert not transitions.succeed(session, job_id, 1, video_key(job_id, 1), 1, "0" * 64)
        assert not transitions.fail(session, job_id, 1, "internal_error", "stale")
        assert not transitions.heartbeat(session, job_id, 1, progress=3).still_owner
        assert not transitions.finish_cancelled(session, job_id, 1)
        assert not transitions.retry_later(session, job_id, 1, "x", "stale")
    assert snapshot() == before
    assert stack.events(job_id) == events


def test_store_down_briefly_during_a_job_is_retried_and_succeeds(stack):
    job_id = stack.submit("slow", prompt="a red panda eating bamboo", num_inference_steps=30)
    stack.wait_progress(job_id, 50)
    stop_store(stack)
    try:
        wait_for(
            lambda: (
                f"job {job_id} upload of {video_key(job_id, 1)} failed on try"
                in stack.worker_logs()
            ),
            30,
            "a failed upload try",
        )
        assert stack.row(job_id).status == "running"
    finally:
        stack.s3.start()
    stack.wait_status(job_id, "succeeded", "failed", timeout=30)
    assert_rendered(stack, job_id, 1, {**SLOW, "seed": 1234})


def test_warm_shutdown_waits_for_an_in_flight_upload(stack):
    """SIGTERM while a rendered job is still uploading: the worker finishes the upload (the
    message is already acknowledged, so nothing else would) and only then exits."""
    stop_store(stack)
    try:
        job_id = stack.submit("tiny", prompt="a dog baking a cake")
        wait_for(
            lambda: (
                f"job {job_id} upload of {video_key(job_id, 1)} failed on try 1,"
                in stack.worker_logs()
            ),
            90,  # a render on a loaded 2-core machine, then the first try
            "a failed upload try",
        )
        worker, _ = worker_of(stack, job_id)
        worker.popen.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert worker.popen.poll() is None, "the worker must not exit with an upload pending"
    finally:
        stack.s3.start()
    try:
        stack.wait_status(job_id, "succeeded", "failed", timeout=90)
        assert worker.popen.wait(timeout=60) == 0
        assert_rendered(stack, job_id, 1, {**TINY, "seed": 1234})
    finally:
        # Give the module its second worker back.
        index = stack.workers.index(worker)
        worker.stop()
        log_dir = worker.log_path.parent
        stack.workers[index] = start_workers(stack.settings, log_dir, 1, name=f"{index}b")[0]


@pytest.fixture(scope="module")
def postgres_stack(tmp_path_factory, valkey_server, s3_server, postgres_server, tiny_t2v):
    name = f"worker_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_server.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = postgres_server.url.rsplit("/", 1)[0] + f"/{name}"
    tmp = tmp_path_factory.mktemp("worker-postgres")
    yield from make_stack(tmp, url, valkey_server, s3_server, {"tiny": tiny_t2v}, workers=1)


def test_one_job_renders_on_postgres(postgres_stack):
    job_id = postgres_stack.submit("tiny", width=48, height=32, num_frames=9, seed=99)
    postgres_stack.wait_status(job_id, "succeeded", "failed", "cancelled", timeout=90)
    assert_rendered(
        postgres_stack, job_id, 1, {"num_frames": 9, "width": 48, "height": 32, "seed": 99}
    )
    assert [e[1] for e in postgres_stack.events(job_id)] == ["queued", "running", "succeeded"]
