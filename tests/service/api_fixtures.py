"""What the API tests share: a served tiny T2V and I2V model, the app on real Valkey,
SeaweedFS and a migrated SQLite file, two tenants' keys, and the helpers that post and
check. The fixtures are registered for tests/service by its conftest."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from fvb_core.api_keys import create_api_key
from fvb_core.db import transitions
from fvb_core.db.migrate import upgrade
from fvb_core.db.models import Job, JobEvent
from fvb_core.db.session import session_scope
from fvb_core.settings import Settings
from fvb_core.storage import video_key
from fvb_tools.localstack.ports import free_port
from scheduler.api.app import create_app

T2V, I2V = "tiny-t2v", "tiny-i2v"
T2V_POOL, I2V_POOL = "api-test-t2v", "api-test-i2v"


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models_toml(tmp_path_factory, tiny_t2v, tiny_i2v) -> Path:
    path = tmp_path_factory.mktemp("api-config") / "models.toml"
    path.write_text(
        f'[models."{T2V}"]\npath = "{tiny_t2v}"\npool = "{T2V_POOL}"\n'
        'default_size = "64x64"\ndefault_fps = 8\nmax_frames = 33\nmax_steps = 20\n'
        "max_pixels = 65536\n\n"
        f'[models."{I2V}"]\npath = "{tiny_i2v}"\npool = "{I2V_POOL}"\n'
        'default_size = "64x64"\ndefault_fps = 8\nmax_frames = 33\nmax_steps = 20\n'
    )
    return path


@pytest.fixture(scope="module")
def settings(tmp_path_factory, models_toml, valkey_server, s3_server) -> Settings:
    url = f"sqlite:///{tmp_path_factory.mktemp('api-db') / 'fvb.db'}"
    upgrade(url)
    return Settings(
        database_url=url,
        broker_url=valkey_server.url,
        s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
        s3_bucket="fvb-api-tests",
        models_config=models_toml,
    )


@pytest.fixture(scope="module")
def client(settings) -> TestClient:
    return TestClient(create_app(settings))


@pytest.fixture(scope="module")
def keys(settings) -> dict[str, str]:
    with session_scope(settings.database_url) as session:
        return {
            "acme": create_api_key(session, "acme", name="tests"),
            "globex": create_api_key(session, "globex"),
        }


@pytest.fixture(scope="module")
def acme(keys) -> dict[str, str]:
    return {"Authorization": f"Bearer {keys['acme']}"}


@pytest.fixture(scope="module")
def globex(keys) -> dict[str, str]:
    return {"Authorization": f"Bearer {keys['globex']}"}


@pytest.fixture(scope="module")
def broker(valkey_server) -> redis.Redis:
    return redis.Redis.from_url(valkey_server.url)


@pytest.fixture(scope="module")
def s3(s3_server):
    return s3_server.client()


# --- helpers -----------------------------------------------------------------------------


def multipart(fields: dict) -> list[tuple]:
    """Fields as the SDK encodes them: every value a string part, dicts as ``key[sub]``."""
    parts = []
    for name, value in fields.items():
        if isinstance(value, dict):
            parts += [(f"{name}[{k}]", (None, str(v))) for k, v in value.items()]
        elif isinstance(value, tuple):
            parts.append((name, value))
        else:
            parts.append((name, (None, str(value))))
    return parts


def submit(client, headers, encoding="multipart", **fields):
    body = {"model": T2V, "prompt": "a red panda eating bamboo", **fields}
    if encoding == "json":
        return client.post("/v1/videos", json=body, headers=headers)
    return client.post("/v1/videos", files=multipart(body), headers=headers)


def load_job(settings, job_id) -> Job:
    with session_scope(settings.database_url) as session:
        return session.get(Job, job_id)


def events(settings, job_id) -> list[tuple]:
    with session_scope(settings.database_url) as session:
        rows = session.execute(
            select(JobEvent.from_status, JobEvent.to_status)
            .where(JobEvent.job_id == job_id)
            .order_by(JobEvent.id)
        ).all()
    return [tuple(row) for row in rows]


def queued_job_ids(broker, queue) -> list[str]:
    """Job ids in the Celery messages waiting in `queue` (every priority list of it)."""
    ids = []
    for key in broker.keys(f"{queue}*"):
        for raw in broker.lrange(key, 0, -1):
            message = json.loads(raw)
            assert message["headers"]["task"] == "fvb.render"
            args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            ids.append(args[0])
    return ids


def png_bytes(size=(64, 48), mode="RGB", fmt="PNG") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, (200, 30, 30) if mode == "RGB" else (200, 30, 30, 128)).save(
        out, format=fmt
    )
    return out.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def assert_error(response, status, param, *fragments):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    return error


def run_to_success(settings, s3, job_id, content=b"\x00\x00\x00\x18ftypmp42fake-mp4") -> bytes:
    """Play the worker: claim, upload the mp4 at the attempt's key, succeed."""
    with session_scope(settings.database_url) as session:
        claim = transitions.claim(session, job_id, "test-worker")
    key = video_key(job_id, claim.attempt)
    s3.put_object(Bucket=settings.s3_bucket, Key=key, Body=content, ContentType="video/mp4")
    with session_scope(settings.database_url) as session:
        assert transitions.succeed(
            session, job_id, claim.attempt, key, len(content), hashlib.sha256(content).hexdigest()
        )
    return content


@contextlib.contextmanager
def serve(app) -> Iterator[int]:
    """``app`` on a real uvicorn server in this process (so monkeypatch reaches it); its port."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_keep_alive=30)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server_url(settings) -> Iterator[str]:
    with serve(create_app(settings)) as port:
        yield f"http://127.0.0.1:{port}/v1"
