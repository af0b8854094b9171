"""JSON log lines with the work's context (``fvb_core/logs.py``): every line a worker logs
while it runs a job (the render and the finishing thread's upload) names the job, its
attempt and the worker; every line the API logs while it serves a request names the
request's ``X-Request-ID``."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from fvb_core import logs

from .api_fixtures import submit

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The root logger's output as JSON lines into a buffer, restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    logs.configure("INFO", "json", stream)
    try:
        yield stream
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_a_line_is_one_json_object_with_the_bound_fields(captured):
    log = logging.getLogger("fvb.test")
    with logs.bound(job_id="video_1", attempt=2, worker_id=None):
        log.info("rendering %s", "now")
        with logs.bound(request_id="req-9"):
            log.warning("inner", extra={"job_id": "given"})
    log.info("outside")
    first, inner, outside = lines(captured)
    assert first["message"] == "rendering now" and first["level"] == "INFO"
    assert (first["job_id"], first["attempt"], first["name"]) == ("video_1", 2, "fvb.test")
    assert "worker_id" not in first and "request_id" not in first and first["time"]
    assert (inner["job_id"], inner["request_id"], inner["level"]) == ("given", "req-9", "WARNING")
    assert "job_id" not in outside and "attempt" not in outside


def test_the_text_format_appends_the_fields():
    record = logging.LogRecord("fvb", logging.INFO, __file__, 1, "hello", (), None)
    record.job_id, record.attempt = "video_1", 1
    assert logs.formatter("text").format(record).endswith("hello [job_id=video_1 attempt=1]")
    with pytest.raises(ValueError, match="FVB_LOG_FORMAT"):
        logs.formatter("xml")


def test_every_line_of_a_jobs_work_names_the_job_attempt_and_worker(in_process, captured):
    runner = in_process.runner()
    job_id = in_process.submit(prompt="a heron in the reeds", seed=4)
    captured.truncate(0)
    captured.seek(0)
    in_process.run_all(runner, [job_id])
    mine = [line for line in lines(captured) if job_id in line["message"]]
    # The claim, the render's lines and the finishing thread's upload and record.
    assert any("claimed attempt 1" in line["message"] for line in mine), mine
    assert any(line["threadName"] != "MainThread" for line in mine), mine  # finishing
    for line in mine:
        assert line.get("job_id") == job_id, line
        assert line.get("worker_id") == runner.worker_id, line
        if "claimed attempt" not in line["message"] and "claimable" not in line["message"]:
            assert line.get("attempt") == 1, line
    # Nothing of the job's context leaks out of its run.
    assert "job_id" not in logs.current()


def test_api_lines_carry_the_request_id(client, acme, captured):
    answer = submit(client, {**acme, "X-Request-ID": "req-logs-1"}, encoding="json")
    assert answer.status_code == 200, answer.text
    video_id = answer.json()["id"]
    (queued,) = [line for line in lines(captured) if f"job {video_id} queued" in line["message"]]
    assert queued["request_id"] == "req-logs-1"
