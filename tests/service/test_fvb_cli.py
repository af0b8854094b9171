"""The `fvb` command as an operator uses it: migrate, create a key, bring the stack up and
down with Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
from sqlalchemy import create_engine, inspect

FVB = [sys.executable, "-m", "scheduler.cli"]


def test_db_upgrade_then_keys_create_gives_a_key_the_api_accepts(tmp_path):
    from fastapi.testclient import TestClient

    from scheduler.api.app import create_app
    from scheduler.models_config import write_models_config
    from scheduler.settings import Settings

    url = f"sqlite:///{tmp_path / 'fvb.db'}"
    env = {**os.environ, "FVB_DATABASE_URL": url}
    upgraded = subprocess.run([*FVB, "db", "upgrade"], env=env, capture_output=True, text=True)
    assert upgraded.returncode == 0, upgraded.stderr
    assert {"jobs", "job_events", "api_keys"} <= set(inspect(create_engine(url)).get_table_names())

    created = subprocess.run(
        [*FVB, "keys", "create", "--tenant", "acme"], env=env, capture_output=True, text=True
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("fvb-") and "shown only now" in created.stderr

    models = tmp_path / "models.toml"
    from fastvideo.testing.tiny_wan import save_tiny_wan

    write_models_config(models, {"tiny": {"path": save_tiny_wan(tmp_path / "tiny")}})
    settings = Settings(
        database_url=url,
        models_config=models,
        broker_url="redis://127.0.0.1:1/0",
        s3_endpoint_url="http://127.0.0.1:1",
    )
    client = TestClient(create_app(settings))
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert (
        client.get("/v1/models", headers={"Authorization": "Bearer fvb-wrong"}).status_code == 401
    )


def test_fvb_up_serves_and_ctrl_c_stops_everything(tmp_path):
    process = subprocess.Popen(
        [*FVB, "up", "--data-dir", str(tmp_path / "stack"), "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        output = "".join(lines)
        api = re.search(r"^API\s+(http://127\.0\.0\.1:\d+/v1)$", output, re.M)
        key = re.search(r"^dev key\s+(fvb-\S+)$", output, re.M)
        assert api and key, output
        assert re.search(r"^dashboard\s+http://127\.0\.0\.1:\d+/dashboard#key=fvb-", output, re.M)
        request = urllib.request.Request(
            f"{api.group(1)}/models", headers={"Authorization": f"Bearer {key.group(1)}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert b"tiny-wan-t2v" in response.read()
        children = psutil.Process(process.pid).children(recursive=True)
        assert len(children) >= 5  # valkey, weed, api, scheduler, worker (+ its pool child)

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=90) == 0
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if process.poll() is None:
            process.kill()
