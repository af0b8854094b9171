"""``fvb bulk`` end to end on the real local stack (Valkey, SeaweedFS, SQLite, API, scheduler
and a Celery worker process rendering a tiny random-weight model on the CPU): a prompt file
in, every video plus a Parquet manifest out; resumed submits, a changed line, retry of a
failed item after its cause was fixed, and cancel.

The failure is real: the model ``tiny-flaky`` is a copy of the tiny model whose transformer
weights are cut short, so the worker's load fails (``model_load_failed``) while the API,
which validates against the configs, accepts the job; the weights are then put back and
``retry-failed`` renders it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import boto3
import pandas as pd
import pyarrow.parquet as pq
import pytest

from fvb_core.manifest import COLUMN_NAMES
from fvb_tools.cli import main
from fvb_tools.localstack.stack import LocalStack

pytestmark = pytest.mark.timeout(600)

SETS = ["--set", "size=64x64", "--set", "seconds=1", "--set", "fps=8"]
SETS += ["--set", "num_inference_steps=2"]
PROMPTS = ["a red panda in the snow", "waves on a rocky shore", "a lighthouse at dusk"]
WEIGHTS = Path("transformer") / "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from fastvideo.testing.tiny_wan import TinyWanConfig, save_tiny_wan
    from fvb_core.models_config import write_models_config

    root = tmp_path_factory.mktemp("bulk")
    good, flaky = root / "models" / "tiny", root / "models" / "flaky"
    save_tiny_wan(good, TinyWanConfig(), seed=0)
    shutil.copytree(good, flaky)
    (flaky / WEIGHTS).write_bytes((good / WEIGHTS).read_bytes()[:100])
    config = root / "models.toml"
    entry = {"default_size": "64x64", "max_frames": 33}
    write_models_config(
        config, {"tiny-wan-t2v": {"path": good, **entry}, "tiny-flaky": {"path": flaky, **entry}}
    )
    local = LocalStack(data_dir=root / "stack", device="cpu", models_config=config)
    info = local.start()
    try:
        yield info, good, flaky
    finally:
        local.stop()


def fvb(capsys, stack, *args: str) -> tuple[int, str, str]:
    info = stack[0]
    client = ["--api-url", info.api_url, "--api-key", info.dev_key, "--no-progress"]
    code = main(["bulk", *args, *client])
    out, err = capsys.readouterr()
    return code, out, err


def s3_client(info):
    return boto3.client(
        "s3",
        endpoint_url=info.env["FVB_S3_ENDPOINT_URL"],
        aws_access_key_id=info.env["FVB_S3_ACCESS_KEY"],
        aws_secret_access_key=info.env["FVB_S3_SECRET_KEY"],
        region_name="us-east-1",
    )


def stored_sha256(s3, uri: str) -> str:
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    return hashlib.sha256(s3.get_object(Bucket=bucket, Key=key)["Body"].read()).hexdigest()


def submitted(out: str) -> tuple[int, int]:
    """(new, already there) from submit's summary line."""
    line = next(x for x in out.splitlines() if "videos submitted" in x)
    new = int(line.split("(")[1].split(" new")[0])
    existing = int(line.split(", ")[-1].split(" already")[0])
    return new, existing


def test_jsonl_prompts_by_seeds_to_a_verified_parquet_manifest(stack, capsys, tmp_path):
    info = stack[0]
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text(
        "\n".join(
            [
                json.dumps(PROMPTS[0]),
                json.dumps({"prompt": PROMPTS[1], "negative_prompt": "blurry"}),
                json.dumps({"prompt": PROMPTS[2], "metadata": {"shot": "7"}}),
            ]
        )
        + "\n"
    )
    args = ["submit", str(dataset), "--model", "tiny-wan-t2v", "--seeds", "0-1", "--name", "ds"]
    code, out, err = fvb(capsys, stack, *args, *SETS)
    assert code == 0, (out, err)
    assert submitted(out) == (6, 0)

    code, out, err = fvb(capsys, stack, "watch", "ds")
    assert code == 0, (out, err)
    assert "completed 6" in out, out

    manifest, videos = tmp_path / "manifest.parquet", tmp_path / "videos"
    code, out, err = fvb(
        capsys, stack, "export", "ds", "--out", str(manifest), "--download", str(videos),
        "--workers", "3",
    )  # fmt: skip
    assert code == 0, (out, err)
    assert "6 rows written" in out and "6 videos" in out

    frame = pd.read_parquet(manifest)
    assert list(frame.columns) == [*COLUMN_NAMES, "local_path"]
    assert len(frame) == 6 and frame["item_key"].is_unique
    assert sorted(zip(frame["line"], frame["seed"], strict=True)) == [
        (line, seed) for line in (1, 2, 3) for seed in (0, 1)
    ]
    assert set(frame["status"]) == {"completed"}
    assert set(frame["prompt"]) == set(PROMPTS)
    assert frame.loc[frame["line"] == 2, "negative_prompt"].tolist() == ["blurry", "blurry"]
    assert (frame[["width", "height", "fps", "num_inference_steps"]] == [64, 64, 8, 2]).all().all()
    assert (frame["frames"] == 9).all()  # 1 s at 8 fps -> 8 -> the VAE's 4k+1
    assert frame["model_revision"].str.fullmatch("[0-9a-f]{16}").all()
    assert frame["model_revision"].nunique() == 1 and set(frame["gpu_name"]) == {"cpu"}
    assert (frame["render_s"] > 0).all() and (frame["upload_s"] > 0).all()
    assert (frame["queue_wait_s"] >= 0).all() and frame["worker_id"].notna().all()
    assert json.loads(frame["params"][0])["num_inference_steps"] == 2

    s3 = s3_client(info)
    for row in frame.itertuples():
        # The stored object, the manifest and the downloaded file are the same bytes.
        assert stored_sha256(s3, row.storage_uri) == row.sha256
        local = Path(row.local_path)
        assert local.parent == videos and local.stat().st_size == row.bytes
        assert hashlib.sha256(local.read_bytes()).hexdigest() == row.sha256
    assert len(list(videos.iterdir())) == 6  # no .part file left

    import datasets

    loaded = datasets.load_dataset("parquet", data_files=str(manifest), split="train")
    assert loaded.num_rows == 6 and set(loaded["sha256"]) == set(frame["sha256"])

    # The same file again under the same name: nothing new.
    code, out, err = fvb(capsys, stack, *args, *SETS)
    assert code == 0 and submitted(out) == (0, 6), (out, err)
    # One line changed: its two seeds are new items, the rest resume.
    lines = dataset.read_text().splitlines()
    lines[2] = json.dumps({"prompt": "a lighthouse at dawn", "metadata": {"shot": "7"}})
    dataset.write_text("\n".join(lines) + "\n")
    code, out, err = fvb(capsys, stack, *args[:5], "0", "--name", "ds", *SETS)
    assert code == 0 and submitted(out) == (1, 2), (out, err)  # seed 0 only: 1 new, 2 there

    code, out, err = fvb(capsys, stack, "watch", "ds")
    assert code == 0 and "completed 7" in out, (out, err)
    jsonl = tmp_path / "manifest.jsonl"
    code, out, err = fvb(capsys, stack, "export", "ds", "--out", str(jsonl))
    assert code == 0, (out, err)
    rows = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert len(rows) == 7 and {r["prompt"] for r in rows} == {*PROMPTS, "a lighthouse at dawn"}

    code, out, _ = fvb(capsys, stack, "status", "ds")
    assert code == 0 and "completed 7" in out, out
    code, out, _ = fvb(capsys, stack, "list")
    assert code == 0 and "ds " in out and "7/7" in out, out


def test_csv_columns_become_video_fields(stack, capsys, tmp_path):
    dataset = tmp_path / "shots.csv"
    dataset.write_text(
        "prompt,seed,num_inference_steps,negative_prompt\n"
        "a paper boat on a river,4,3,\n"
        '"a dog, running",5,2,low quality\n'
    )
    args = ["submit", str(dataset), "--model", "tiny-wan-t2v", "--name", "csv-ds"]
    code, out, err = fvb(capsys, stack, *args, "--set", "size=64x64", "--set", "seconds=1")
    assert code == 0 and submitted(out) == (2, 0), (out, err)
    code, out, err = fvb(capsys, stack, "watch", "csv-ds")
    assert code == 0 and "completed 2" in out, (out, err)
    manifest = tmp_path / "csv.parquet"
    assert fvb(capsys, stack, "export", "csv-ds", "--out", str(manifest))[0] == 0
    rows = sorted(pq.read_table(manifest).to_pylist(), key=lambda r: r["line"])
    assert [(r["line"], r["prompt"], r["seed"]) for r in rows] == [
        (2, "a paper boat on a river", 4),
        (3, "a dog, running", 5),
    ]
    assert [r["num_inference_steps"] for r in rows] == [3, 2]
    assert [r["negative_prompt"] for r in rows] == [None, "low quality"]
    assert all(r["status"] == "completed" and r["sha256"] for r in rows)


def test_retry_failed_renders_the_item_once_its_cause_is_fixed(stack, capsys, tmp_path):
    _, good, flaky = stack
    dataset = tmp_path / "one.txt"
    dataset.write_text("a fox in the forest\n")
    args = ["submit", str(dataset), "--model", "tiny-flaky", "--name", "flaky", *SETS]
    assert fvb(capsys, stack, *args)[0] == 0
    code, out, _ = fvb(capsys, stack, "watch", "flaky")
    assert code == 1 and "failed 1" in out, out
    manifest = tmp_path / "failed.jsonl"
    assert fvb(capsys, stack, "export", "flaky", "--out", str(manifest))[0] == 0
    (failed,) = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert failed["status"] == "failed" and failed["error_code"] == "model_load_failed"
    assert failed["sha256"] is None and failed["attempts"] == 1

    shutil.copyfile(good / WEIGHTS, flaky / WEIGHTS)  # the cause, fixed
    code, out, _ = fvb(capsys, stack, "retry-failed", "flaky", "--code", "model_load_failed")
    assert code == 0 and "1 failed videos queued again" in out, out
    code, out, _ = fvb(capsys, stack, "watch", "flaky")
    assert code == 0 and "completed 1" in out, out
    assert fvb(capsys, stack, "export", "flaky", "--out", str(manifest))[0] == 0
    (done,) = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert (done["video_id"], done["item_key"]) == (failed["video_id"], failed["item_key"])
    assert done["status"] == "completed" and done["attempts"] == 2 and done["error_code"] is None
    assert stored_sha256(s3_client(stack[0]), done["storage_uri"]) == done["sha256"]
    # Resubmitting the file still finds the same item: retried, not duplicated.
    code, out, _ = fvb(capsys, stack, *args)
    assert code == 0 and submitted(out) == (0, 1), out


def test_cancel_stops_the_rest_of_the_batch(stack, capsys, tmp_path):
    dataset = tmp_path / "many.txt"
    dataset.write_text("".join(f"prompt number {i}\n" for i in range(12)))
    args = ["submit", str(dataset), "--model", "tiny-wan-t2v", "--name", "big", *SETS]
    assert fvb(capsys, stack, *args)[0] == 0
    code, out, _ = fvb(capsys, stack, "cancel", "big")
    assert code == 0 and "cancelled" in out, out
    # What is still running finishes (at most one video on the one worker); nothing starts.
    deadline = time.monotonic() + 120
    while True:
        code, out, _ = fvb(capsys, stack, "status", "big")
        if "queued 0" in out and "in_progress 0" in out:
            break
        assert time.monotonic() < deadline, out
        time.sleep(0.5)
    manifest = tmp_path / "big.jsonl"
    assert fvb(capsys, stack, "export", "big", "--out", str(manifest))[0] == 0
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    statuses = [r["status"] for r in rows]
    assert len(rows) == 12 and set(statuses) <= {"completed", "cancelled"}
    assert statuses.count("cancelled") >= 10, statuses
    assert all(r["error_code"] == "cancelled" for r in rows if r["status"] == "cancelled")
