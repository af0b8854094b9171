"""Admission per tenant (a limit per key, a Retry-After from the tenant's drain rate, other
tenants untouched) and routing by GPU count (a model no pool can run is refused at create; a
worker whose GPU group does not match its pool refuses to start)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from fvb_core.api_keys import create_api_key
from fvb_core.db import transitions
from fvb_core.db.migrate import upgrade
from fvb_core.db.models import Job, utcnow
from fvb_core.db.session import session_scope
from fvb_core.settings import Settings
from scheduler.api.app import create_app

from .api_fixtures import assert_error

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def deployment(tmp_path, tiny_t2v, valkey_server, s3_server) -> Settings:
    config = tmp_path / "models.toml"
    config.write_text(
        f"[pools.small]\ngpus = 1\n[pools.big]\ngpus = 4\n\n"
        f'[models."one"]\npath = "{tiny_t2v}"\npool = "small"\ndefault_size = "64x64"\n'
        f'[models."two-in-small"]\npath = "{tiny_t2v}"\npool = "small"\ngpus = 2\n'
        'default_size = "64x64"\n'
        f'[models."two-in-big"]\npath = "{tiny_t2v}"\npool = "big"\ngpus = 2\n'
        'default_size = "64x64"\n'
    )
    url = f"sqlite:///{tmp_path / 'fvb.db'}"
    upgrade(url)
    return Settings(
        database_url=url,
        broker_url=valkey_server.url,
        s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
        s3_bucket="fvb-admission-tests",
        models_config=config,
        max_queued_jobs=1000,
    )


def bearer(settings: Settings, tenant: str, **key) -> dict[str, str]:
    with session_scope(settings.database_url) as session:
        return {"Authorization": f"Bearer {create_api_key(session, tenant, **key)}"}


def post(client, headers, model="one", **fields):
    return client.post(
        "/v1/videos", json={"model": model, "prompt": "a cat", **fields}, headers=headers
    )


def stored(settings: Settings) -> int:
    with session_scope(settings.database_url) as session:
        return session.execute(select(func.count()).select_from(Job)).scalar_one()


def test_a_keys_limit_holds_its_tenant_and_retry_after_follows_the_drain_rate(deployment):
    client = TestClient(create_app(deployment))
    limited = bearer(deployment, "acme", max_queued=2)
    other = bearer(deployment, "globex")
    # 60 of acme's jobs finished in the last ten minutes: 0.1 job/s.
    with session_scope(deployment.database_url) as session:
        done = [
            Job(tenant="acme", model="one", params={"prompt": "old"}, pool="small")
            for _ in range(60)
        ]
        transitions.create_jobs(session, done)
        for job in done:
            claim = transitions.claim(session, job.id, "w")
            transitions.succeed(session, job.id, claim.attempt, "k", 1, "0" * 64)
    assert [post(client, limited).status_code for _ in range(2)] == [200, 200]
    refused = post(client, limited)
    error = assert_error(refused, 429, None, "'acme' has 2 queued jobs (limit 2)")
    assert error["code"] == "queue_full"
    assert refused.headers["retry-after"] == "10"  # one job over, at 0.1 job/s
    batch = client.post(
        "/v1/batches", json={"requests": [{"model": "one", "prompt": "b"}] * 3}, headers=limited
    )
    assert batch.headers["retry-after"] == "30" and "no room for 3 more" in batch.text
    # Another tenant is not held by acme's limit.
    assert post(client, other).status_code == 200
    with session_scope(deployment.database_url) as session:
        assert transitions.queued_of(session, "acme") == 2
        assert transitions.queued_of(session, "globex") == 1


def test_a_tenant_with_nothing_finished_lately_is_told_a_minute(deployment):
    client = TestClient(create_app(deployment))
    headers = bearer(deployment, "newcomer", max_queued=1)
    assert post(client, headers).status_code == 200
    refused = post(client, headers)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "60"


def test_the_counter_follows_every_way_out_of_the_queue(deployment):
    with session_scope(deployment.database_url) as session:
        jobs = [
            Job(tenant="t", model="one", params={"prompt": "p"}, pool="small") for _ in range(4)
        ]
        transitions.create_jobs(session, jobs)
    a, b, c, _d = (job.id for job in jobs)
    with session_scope(deployment.database_url) as session:
        claim = transitions.claim(session, a, "w")  # out (running)
        transitions.request_cancel(session, b)  # out (cancelled)
        transitions.retry_later(session, a, claim.attempt, "storage_unavailable", "x")  # back
        stale = transitions.claim(session, c, "w")
        assert stale is not None
    with session_scope(deployment.database_url) as session:
        transitions.requeue_stale(session, 0.0, now=utcnow() + timedelta(seconds=5))  # c back
        assert transitions.queued_of(session, "t") == 3  # a, c, d
        transitions.recount_queued(session)
        assert transitions.queued_of(session, "t") == 3


def test_a_model_that_needs_more_gpus_than_its_pools_workers_is_refused_at_create(deployment):
    client = TestClient(create_app(deployment))
    headers = bearer(deployment, "acme")
    before = stored(deployment)
    error = assert_error(post(client, headers, model="two-in-small"), 400, "model", "2 GPUs")
    assert error["code"] == "no_pool_can_run"
    assert "pool 'small' own 1" in error["message"]
    assert stored(deployment) == before
    accepted = post(client, headers, model="two-in-big")
    assert accepted.status_code == 200, accepted.text
    with session_scope(deployment.database_url) as session:
        assert session.get(Job, accepted.json()["id"]).pool == "big"


def test_a_worker_whose_gpu_group_does_not_match_its_pool_refuses_to_start(deployment):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FVB_")},
        "PYTHONPATH": str(REPO),
        "FVB_DATABASE_URL": deployment.database_url,
        "FVB_BROKER_URL": deployment.broker_url,
        "FVB_MODELS_CONFIG": str(deployment.models_config),
    }
    run = subprocess.run(
        [sys.executable, "-m", "fvb_tools.cli", "worker", "--gpus", "0", "--pool", "big"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert "pool 'big' is declared with 4 GPU(s) per worker" in run.stderr
    assert "Traceback" not in run.stderr
