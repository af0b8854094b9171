"""A worker that owns a group of ranks: models with ``gpus = 2`` run each job on two
long-lived rank processes, laid out by the model's ``pipeline_options``.

One real Celery worker, real Valkey, S3 (SeaweedFS) and SQLite. Every test runs twice: on CPU
ranks over gloo (``python -m worker.main --device cpu``, in ``make test``) and on two GPUs over
NCCL (``--gpus 0,1``; skipped without two CUDA devices, run on the GPU machine). ``tiny-sp2``
splits the tokens over two ranks (sequence parallel), ``slow-cfg2`` splits classifier-free
guidance (one rank per branch) and is slow enough to cancel mid-way.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import psutil
import pytest
import torch
from sqlalchemy import select

from fvb_core.db import transitions
from fvb_core.db.migrate import upgrade
from fvb_core.db.models import Job
from fvb_core.db.session import session_scope

from .test_worker import (
    SLOW,
    SLOW_MODEL,
    SLOW_STEPS,
    TINY,
    Stack,
    WorkerProcess,
    assert_rendered,
    start_workers,
    stop_workers,
    wait_for,
    worker_settings,
)

pytestmark = pytest.mark.timeout(300)


TWO_GPUS = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"
)
DEVICE_ARGS = {"cpu": ("--device", "cpu"), "cuda": ("--gpus", "0,1")}
# A GPU runs SLOW's steps in milliseconds; 16x the tokens keep the cancel mid-denoising there.
SLOW_JOB = {"cpu": SLOW, "cuda": {**SLOW, "width": 256, "height": 256}}


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=TWO_GPUS)])
def stack(
    request, tmp_path_factory, valkey_server, s3_server, tiny_t2v, slow_model
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp(f"multi-gpu-worker-{request.param}")
    pool = f"mg{uuid.uuid4().hex[:8]}"
    config = tmp / "models.toml"
    config.write_text(
        f'[models."tiny-sp2"]\npath = "{tiny_t2v}"\npool = "{pool}"\ngpus = 2\n'
        f'[models."tiny-sp2".pipeline_options]\nsp_size = 2\ndist_timeout_s = 60\n'
        f'[models."slow-cfg2"]\npath = "{slow_model}"\npool = "{pool}"\ngpus = 2\n'
        f'[models."slow-cfg2".pipeline_options]\ncfg_parallel = true\ndist_timeout_s = 60\n'
    )
    settings = worker_settings(
        f"sqlite:///{tmp / 'fvb.db'}",
        valkey_server,
        s3_server,
        pool,
        config,
        progress_min_interval_s=0.0,  # every step's progress is written
        pipeline_cache_size=2,
    )
    upgrade(settings.database_url)
    client = s3_server.client()
    client.create_bucket(Bucket=settings.s3_bucket)
    stack = Stack(
        settings=settings,
        workers=start_workers(settings, tmp, 1, device_args=DEVICE_ARGS[request.param]),
        s3=s3_server,
        client=client,
        device=request.param,
    )
    try:
        yield stack
    finally:
        stop_workers(stack.workers)


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> str:
    from fastvideo.testing.tiny_wan import save_tiny_wan

    return str(save_tiny_wan(tmp_path_factory.mktemp("models") / "slow-t2v", SLOW_MODEL))


def ranks_of(worker: WorkerProcess, model: str) -> list[int]:
    """The rank pids the worker logged when it loaded ``model``."""
    loads = re.findall(
        rf"pipeline loaded: model={re.escape(model)} .* ranks=\[([\d, ]+)\]", worker.log()
    )
    assert len(loads) == 1, loads  # loaded once: the ranks are long-lived
    return [int(pid) for pid in loads[0].split(",")]


@pytest.mark.parametrize(
    ("cache", "model", "message"),
    [
        (dict(device="cuda", gpus="0,1"), dict(gpus=4), "needs gpus=4 but this worker owns 2"),
        (dict(device="cpu"), dict(gpus=2, pipeline_options={"num_gpus": 4}), "contradicts"),
    ],
)
def test_models_the_worker_cannot_lay_out_fail_to_load(tmp_path, cache, model, message):
    from fvb_core.models_config import ServedModel
    from worker.pipeline_cache import PipelineCache

    with pytest.raises(ValueError, match=message):
        PipelineCache(1, **cache).engine_kwargs(ServedModel(name="m", path=tmp_path, **model))


def test_two_rank_job_renders_through_the_service_path(stack):
    params = {**TINY, "width": 80, "height": 48, "num_frames": 9, "num_inference_steps": 3}
    job_id = stack.submit("tiny-sp2", **params, seed=5)
    row = stack.wait_status(job_id, "succeeded", "failed", "cancelled", timeout=120)
    assert row.status == "succeeded", (row.error_code, row.error_message, stack.worker_logs())
    assert_rendered(stack, job_id, 1, {**params, "seed": 5})
    worker = stack.workers[0]
    ranks = ranks_of(worker, "tiny-sp2")
    assert len(ranks) == 2
    # The ranks are children of the pool child that ran the job, not of the Celery parent's
    # own process, and the pool child is the only one that talks to them.
    child = int(row.worker_id.split(":")[1])
    assert set(ranks) <= {p.pid for p in psutil.Process(child).children()}


def test_cancel_reaches_every_rank_within_two_steps_and_the_ranks_serve_the_next_job(stack):
    job_id = stack.submit("slow-cfg2", prompt="waves on a rocky shore", **SLOW_JOB[stack.device])
    steps_of = {s * 95 // SLOW_STEPS: s for s in range(SLOW_STEPS + 1)}
    asked: list[int] = []

    def cancel_mid_denoising() -> bool:
        row = stack.row(job_id)
        assert row.status in ("queued", "running"), (row.status, row.error_message)
        if row.progress < 10:
            return False
        with session_scope(stack.url) as session:
            assert transitions.request_cancel(session, job_id) == "running"
            # Same transaction: the worker cannot write a newer step before we commit.
            asked.append(session.execute(select(Job.progress).where(Job.id == job_id)).scalar_one())
        return True

    wait_for(cancel_mid_denoising, 120, "slow job at 10% and cancelled", interval=0.02)
    row = stack.wait_status(job_id, "cancelled", "succeeded", "failed", timeout=30)
    assert (row.status, row.error_code) == ("cancelled", "cancelled")
    asked_step, last_step = steps_of[asked[0]], steps_of[row.progress]
    assert asked_step < SLOW_STEPS - 2, "the cancel should land mid-denoising"
    assert 0 <= last_step - asked_step <= 2, (asked_step, last_step)
    assert stack.keys(job_id) == set()

    worker = stack.workers[0]
    ranks = ranks_of(worker, "slow-cfg2")
    assert all(psutil.pid_exists(pid) for pid in ranks)
    # The same ranks render the next job of the model.
    params = {**TINY, "width": 64, "height": 32, "num_frames": 5, "num_inference_steps": 3}
    params["guidance_scale"] = 5.0  # both CFG ranks compute their branch
    next_id = stack.submit("slow-cfg2", **params, seed=9)
    row = stack.wait_status(next_id, "succeeded", "failed", "cancelled", timeout=120)
    assert row.status == "succeeded", (row.error_code, row.error_message)
    assert_rendered(stack, next_id, 1, {**params, "seed": 9})
    assert ranks_of(worker, "slow-cfg2") == ranks
    assert all(psutil.pid_exists(pid) for pid in ranks)
