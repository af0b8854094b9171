"""``fvb submit``: a dataset becomes one batch through a real API server (uvicorn, SQLite,
Valkey, SeaweedFS); rejected lines are named, a re-run resumes without duplicates, and
``--download`` writes the rendered videos (a thread plays the worker here)."""

# test_api's module fixtures are imported by name for pytest to inject; the test functions'
# parameters of the same names are those fixtures, not redefinitions.

from __future__ import annotations

import json
import threading
import time

import pytest
from sqlalchemy import select

from fvb_core.api_keys import create_api_key
from fvb_core.db.models import Job
from fvb_core.db.session import session_scope
from fvb_tools.bulk import read_dataset
from fvb_tools.cli import main

from .api_fixtures import T2V, run_to_success


@pytest.fixture(scope="module")
def bulk_key(settings) -> str:
    with session_scope(settings.database_url) as session:
        return create_api_key(session, "bulk-user")


def dataset(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [
        json.dumps({"prompt": "a red panda in the snow", "seed": 1}),
        json.dumps("waves on a rocky shore"),
        "",
        json.dumps({"prompt": "bad size", "size": "33x32"}),
        json.dumps({"prompt": "a lighthouse at dusk", "seed": 5, "metadata": {"shot": "7"}}),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def batch_jobs(settings, batch_id) -> list[Job]:
    with session_scope(settings.database_url) as session:
        return list(
            session.execute(
                select(Job).where(Job.batch_id == batch_id).order_by(Job.created_at)
            ).scalars()
        )


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["submit", *args, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def test_dataset_becomes_one_batch_and_a_rerun_adds_nothing(
    tmp_path, capsys, server_url, bulk_key, settings
):
    path = dataset(tmp_path)
    args = [str(path), "--model", T2V, "--api-url", server_url, "--api-key", bulk_key]
    code, out, err = run(capsys, *args)
    assert code == 1, (out, err)  # one rejected line
    assert f"{path}:4: size: " in err, err
    batch_id = out.split()[1]
    assert "3 videos submitted" in out
    jobs = batch_jobs(settings, batch_id)
    assert [job.params["prompt"] for job in jobs] == [
        "a red panda in the snow",
        "waves on a rocky shore",
        "a lighthouse at dusk",
    ]
    assert jobs[2].params["metadata"] == {"shot": "7", "fvb_line": "5"}
    assert {job.tenant for job in jobs} == {"bulk-user"}

    code, out, err = run(capsys, *args, "--batch-id", batch_id)
    assert code == 1 and "3 videos submitted" in out
    assert len(batch_jobs(settings, batch_id)) == 3  # idempotent per line


def test_wait_and_download_write_every_rendered_video(
    tmp_path, capsys, server_url, bulk_key, settings, s3
):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\na dog\n")
    base = [str(path), "--model", T2V, "--api-url", server_url, "--api-key", bulk_key]
    code, out, _ = run(capsys, *base)
    assert code == 0
    batch_id = out.split()[1]
    contents: dict[str, bytes] = {}

    def play_worker() -> None:
        for job in batch_jobs(settings, batch_id):
            time.sleep(0.5)
            contents[job.id] = run_to_success(settings, s3, job.id, f"mp4 {job.id}".encode())

    worker = threading.Thread(target=play_worker)
    worker.start()
    out_dir = tmp_path / "videos"
    code, out, err = run(capsys, *base, "--batch-id", batch_id, "--download", str(out_dir))
    worker.join()
    assert code == 0, err
    assert f"batch {batch_id} completed: 2 completed, 0 failed" in out
    files = sorted(out_dir.iterdir())
    assert [f.name.split("-")[0] for f in files] == ["000001", "000003"]
    for file in files:
        video_id = file.stem.split("-", 1)[1]
        assert file.read_bytes() == contents[video_id]


def test_dataset_problems_are_named_before_anything_is_sent(tmp_path, capsys, server_url):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "ok"}\n{"prompt": \n')
    code = main(["submit", str(bad_json), "--model", T2V, "--api-url", server_url])
    assert code == 2 and f"{bad_json}:2: not JSON" in capsys.readouterr().err
    no_model = tmp_path / "p.txt"
    no_model.write_text("a cat\n")
    with pytest.raises(ValueError, match=r"p.txt:1: no model"):
        list(read_dataset(no_model, None))
    code = main(["submit", str(tmp_path / "missing.jsonl"), "--api-url", server_url])
    assert code == 2 and "no such file" in capsys.readouterr().err


def test_unreachable_api_or_bad_key_is_one_clear_line(tmp_path, capsys, server_url):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n")
    code, _, err = run(
        capsys, str(path), "--model", T2V, "--api-url", server_url, "--api-key", "nope"
    )
    assert code == 1 and "HTTP 401" in err
    code, _, err = run(capsys, str(path), "--model", T2V, "--api-url", "http://127.0.0.1:9/v1")
    assert code == 1 and "cannot reach" in err
