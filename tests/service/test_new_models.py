"""Wan2.2 two-expert and DMD-distilled models in the service: ``GET /v1/models`` says what
each takes, the API refuses at create what a model cannot use (``guidance_scale_2`` on a
one-expert model; steps, guidance or a negative prompt on a distilled one), and both kinds
of job render through the real local stack (a Celery worker process on the CPU) with the
parameters they were given."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request

import pytest

from fastvideo.testing.tiny_wan import TinyWanConfig, save_tiny_wan
from fvb_core.models_config import write_models_config
from fvb_tools.localstack.stack import LocalStack

pytestmark = pytest.mark.timeout(600)

ENTRY = {"default_size": "64x64", "max_frames": 33, "default_fps": 8}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("new-models")
    experts = save_tiny_wan(root / "wan22", TinyWanConfig(boundary_ratio=0.8), seed=2)
    plain = save_tiny_wan(root / "wan21", TinyWanConfig(scheduler="flow_match_euler"), seed=3)
    fastwan = root / "fastwan"
    shutil.copytree(plain, fastwan)
    index = json.loads((fastwan / "model_index.json").read_text())
    index["_class_name"] = "WanDMDPipeline"
    (fastwan / "model_index.json").write_text(json.dumps(index))
    config = root / "models.toml"
    write_models_config(
        config,
        {
            "tiny-wan22": {"path": experts, **ENTRY},
            "tiny-wan21": {"path": plain, **ENTRY},
            "tiny-fastwan": {"path": fastwan, **ENTRY},
        },
    )
    local = LocalStack(data_dir=root / "stack", device="cpu", models_config=config)
    info = local.start()
    try:
        yield info
    finally:
        local.stop()


def call(info, method: str, path: str, body=None) -> tuple[int, dict]:
    request = urllib.request.Request(
        info.api_url + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {info.dev_key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def wait_done(info, video_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, video = call(info, "GET", f"/videos/{video_id}")
        assert status == 200, video
        if video["status"] in ("completed", "failed"):
            return video
        assert time.monotonic() < deadline, video
        time.sleep(0.3)


def test_models_say_what_they_take(stack):
    status, listed = call(stack, "GET", "/models")
    assert status == 200
    models = {m["id"]: m for m in listed["data"]}
    assert models["tiny-wan22"]["two_experts"] is True
    assert models["tiny-wan22"]["distilled_steps"] is None
    assert models["tiny-wan21"]["two_experts"] is False
    assert models["tiny-fastwan"]["distilled_steps"] == 3
    assert models["tiny-fastwan"]["pipeline"] == "WanDMDPipeline"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny-wan21", "guidance_scale_2": 2.0}, "guidance_scale_2"),
        ({"model": "tiny-wan22", "guidance_scale_2": -1}, "guidance_scale_2"),
        ({"model": "tiny-fastwan", "num_inference_steps": 8}, "num_inference_steps"),
        ({"model": "tiny-fastwan", "guidance_scale": 5}, "guidance_scale"),
        ({"model": "tiny-fastwan", "negative_prompt": "blurry"}, "negative_prompt"),
    ],
)
def test_what_a_model_cannot_use_is_refused_at_create(stack, body, param):
    status, answer = call(stack, "POST", "/videos", {"prompt": "a kite", **body})
    assert status == 400, answer
    assert answer["error"]["param"] == param, answer


def test_a_two_expert_job_and_a_distilled_job_render_on_the_stack(stack):
    common = {"prompt": "a lighthouse at dusk", "seconds": "1", "seed": 4}
    experts = {"num_inference_steps": 4, "guidance_scale": 4.0, "guidance_scale_2": 2.0}
    status, two = call(stack, "POST", "/videos", {**common, "model": "tiny-wan22", **experts})
    assert status == 200, two
    status, fast = call(stack, "POST", "/videos", {**common, "model": "tiny-fastwan"})
    assert status == 200, fast
    two, fast = wait_done(stack, two["id"]), wait_done(stack, fast["id"])
    assert two["status"] == "completed", two["error"]
    assert fast["status"] == "completed", fast["error"]
    assert (two["guidance_scale"], two["guidance_scale_2"]) == (4.0, 2.0)
    assert (fast["num_inference_steps"], fast["guidance_scale"]) == (3, 1.0)
    for video in (two, fast):
        request = urllib.request.Request(
            f"{stack.api_url}/videos/{video['id']}/content",
            headers={"Authorization": f"Bearer {stack.dev_key}"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.read(12)[4:8] == b"ftyp"  # an mp4
