"""The typed job record (fvb_core.jobs): what validation writes is what the worker reads and
the API shows; and the idempotency race that string keys once hid."""

from __future__ import annotations

import threading

import httpx
import pytest
from sqlalchemy import func, select

from fvb_core.db.models import Job
from fvb_core.db.session import session_scope
from fvb_core.jobs import FINAL_STATUSES, UNFINISHED_STATUSES, JobParams, JobStatus
from scheduler.api.app import create_app

from .api_fixtures import I2V, multipart, png_bytes, serve, submit


def test_final_and_unfinished_states_split_every_state_once():
    assert set(JobStatus) == FINAL_STATUSES | UNFINISHED_STATUSES
    assert not FINAL_STATUSES & UNFINISHED_STATUSES
    assert {s for s in JobStatus if s.is_final} == FINAL_STATUSES


def test_what_validation_writes_the_worker_reads_and_the_api_shows(client, acme, settings):
    video = submit(client, acme, size="64x32", num_frames="17", seed="5", fps="8").json()
    with session_scope(settings.database_url) as session:
        stored = session.get(Job, video["id"]).params
    params = JobParams.from_json(stored)
    assert params.to_json() == stored
    assert params.generation_kwargs() == {
        "prompt": "a red panda eating bamboo",
        "width": 64,
        "height": 32,
        "num_frames": 17,
        "num_inference_steps": params.num_inference_steps,
        "guidance_scale": 5.0,
        "seed": 5,
        "fps": 8,
    }
    assert (video["size"], video["seconds"], video["seed"]) == (params.size, "2", 5)


def test_a_row_with_fields_missing_reads_as_none_and_wrong_types_are_named():
    sparse = JobParams.from_json({"prompt": "a cat", "width": 32, "later": "ignored"})
    assert (sparse.width, sparse.height, sparse.seed, sparse.metadata) == (32, None, None, {})
    assert sparse.generation_kwargs() == {"prompt": "a cat", "width": 32}
    with pytest.raises(ValueError, match=r"params\.prompt"):
        JobParams.from_json({"width": 32})
    with pytest.raises(ValueError, match=r"params\.seed"):
        JobParams.from_json({"prompt": "p", "seed": "7"})
    with pytest.raises(ValueError, match=r"params\.width"):
        JobParams.from_json({"prompt": "p", "width": True})


def test_work_grows_with_frames_pixels_steps_and_guidance():
    base = JobParams(prompt="p", width=64, height=64, num_frames=17, num_inference_steps=10)
    assert JobParams(**{**base.__dict__, "num_frames": 33}).work > base.work
    assert JobParams(**{**base.__dict__, "guidance_scale": 5.0}).work == 2 * base.work


def test_two_creates_racing_on_one_idempotency_key_leave_one_job_and_one_image(
    settings, keys, s3, monkeypatch
):
    """Both requests store their image before either inserts; the loser must remove its
    image (the clean-up read a key the job never had, so it never ran)."""
    from scheduler.api import jobs

    barrier = threading.Barrier(2, timeout=20)
    upload = jobs._upload_image

    uploaded: list[str] = []

    def upload_then_wait(context, job_id, png):
        key = upload(context, job_id, png)
        uploaded.append(job_id)
        barrier.wait()
        return key

    monkeypatch.setattr(jobs, "_upload_image", upload_then_wait)
    headers = {"Authorization": f"Bearer {keys['acme']}", "Idempotency-Key": "race-1"}
    fields = {
        "model": I2V,
        "prompt": "a dog",
        "input_reference": ("d.png", png_bytes(), "image/png"),
    }
    with serve(create_app(settings)) as port:
        url = f"http://127.0.0.1:{port}/v1/videos"
        answers: list[httpx.Response] = []

        def post() -> None:
            answers.append(httpx.post(url, files=multipart(fields), headers=headers, timeout=60))

        threads = [threading.Thread(target=post) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert sorted(a.status_code for a in answers) == [200, 200], [a.text for a in answers]
    ids = {a.json()["id"] for a in answers}
    assert len(ids) == 1
    with session_scope(settings.database_url) as session:
        count = session.execute(
            select(func.count()).select_from(Job).where(Job.idempotency_key == "race-1")
        ).scalar_one()
    assert count == 1
    (winner,) = ids
    assert len(uploaded) == 2 and winner in uploaded
    for job_id in uploaded:
        listed = s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix=f"inputs/{job_id}/")
        kept = [o["Key"] for o in listed.get("Contents", [])]
        assert kept == ([f"inputs/{job_id}/image.png"] if job_id == winner else []), job_id
