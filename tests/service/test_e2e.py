"""The whole service as a user runs it: `fvb up`'s stack (real Valkey, SeaweedFS, database,
API, scheduler and Celery worker processes), driven by the official OpenAI SDK."""

from __future__ import annotations

import hashlib
import io

import av
import boto3
import pytest
from openai import OpenAI
from PIL import Image
from sqlalchemy import select

from fvb_core.db.models import Job
from fvb_core.db.session import session_scope
from fvb_tools.localstack.demo import SAMPLES, run_demo
from fvb_tools.localstack.stack import LocalStack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    local = LocalStack(data_dir=tmp_path_factory.mktemp("stack"), device="cpu")
    info = local.start()
    try:
        yield info
    finally:
        local.stop()


def _decode(path) -> tuple[int, int, int]:
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
        return len(frames), frames[0].width, frames[0].height


def test_sdk_job_completes_and_the_stored_bytes_match_the_database(stack, tmp_path):
    client = OpenAI(base_url=stack.api_url, api_key=stack.dev_key, max_retries=0)
    video = client.videos.create_and_poll(
        model="tiny-wan-t2v",
        prompt="a lighthouse in a storm",
        size="128x64",
        seconds="2",
        poll_interval_ms=200,
        extra_body={"num_inference_steps": 4, "fps": 8, "seed": 3},
    )
    assert video.status == "completed", video.error
    assert video.progress == 100

    local = tmp_path / "video.mp4"
    client.videos.download_content(video.id).write_to_file(local)
    assert _decode(local) == (17, 128, 64)  # 2 s at 8 fps -> 16 -> the VAE's 4k+1 = 17
    downloaded = hashlib.sha256(local.read_bytes()).hexdigest()

    with session_scope(stack.env["FVB_DATABASE_URL"]) as session:
        job = session.execute(select(Job).where(Job.id == video.id)).scalar_one()
    assert job.output_key == f"videos/{video.id}/attempt-1.mp4"
    s3 = boto3.client(
        "s3",
        endpoint_url=stack.env["FVB_S3_ENDPOINT_URL"],
        aws_access_key_id=stack.env["FVB_S3_ACCESS_KEY"],
        aws_secret_access_key=stack.env["FVB_S3_SECRET_KEY"],
        region_name="us-east-1",
    )
    stored = s3.get_object(Bucket="fvb-videos", Key=job.output_key)["Body"].read()
    assert hashlib.sha256(stored).hexdigest() == job.output_sha256 == downloaded
    assert job.output_bytes == len(stored)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="fvb-videos", Prefix="videos/")["Contents"]]
    assert sorted(k for k in keys if video.id in k) == [
        f"videos/{video.id}/attempt-1.json",
        f"videos/{video.id}/attempt-1.mp4",
        f"videos/{video.id}/attempt-1.spritesheet.jpg",
        f"videos/{video.id}/attempt-1.thumbnail.webp",
    ]

    # The previews, through the SDK as OpenAI's clients fetch them.
    thumbnail = client.videos.download_content(video.id, variant="thumbnail")
    assert thumbnail.response.headers["content-type"] == "image/webp"
    with Image.open(io.BytesIO(thumbnail.content)) as image:
        assert (image.format, image.size) == ("WEBP", (128, 64))
    sheet = client.videos.download_content(video.id, variant="spritesheet")
    assert sheet.response.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(sheet.content)) as image:
        assert image.format == "JPEG" and image.width > image.height


def test_make_demo_path_renders_every_sample(tmp_path):
    videos = run_demo(tmp_path / "stack", tmp_path / "out", device="cpu")
    assert [v.status for v in videos] == ["completed"] * len(SAMPLES)
    for video in videos:
        assert video.storage_uri == f"s3://fvb-videos/videos/{video.id}/attempt-1.mp4"
        assert hashlib.sha256(video.local_path.read_bytes()).hexdigest() == video.sha256
        assert _decode(video.local_path) == (17, 128, 128)
