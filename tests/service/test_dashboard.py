"""The monitoring dashboard: the static page, and ``/dashboard/data`` computed from jobs put
into a migrated database (SQLite, then a real PostgreSQL) through the real state machine
(``fvb_core.db.transitions``) on a fake clock, so every count, duration and percentile is
known exactly.

Storage and broker are not needed here (the dashboard reads only the database): the app is
built against closed loopback ports for both, as in the readiness tests of test_api.py.
"""

from __future__ import annotations

import base64
import hashlib
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, event, update

from fvb_core.api_keys import create_api_key
from fvb_core.db import transitions
from fvb_core.db.migrate import upgrade
from fvb_core.db.models import Batch, Job
from fvb_core.db.session import get_engine, session_scope
from fvb_core.settings import Settings
from fvb_tools.localstack.ports import free_port
from fvb_tools.localstack.postgres import create_database
from scheduler.api.app import create_app

T2V, I2V = "tiny-t2v", "tiny-i2v"
T2V_POOL, I2V_POOL = "dash-t2v", "dash-i2v"
#: The dashboard's "now"; every job below is placed relative to it.
NOW = datetime(2030, 1, 2, 12, 0, 0, tzinfo=UTC)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


class Clock:
    """Stands in for ``utcnow`` in the state machine while the fixtures build history."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


# --- fixtures ----------------------------------------------------------------------------


def database_url(request, root: Path) -> str:
    """A fresh, migrated database of the kind the fixture's param names."""
    if request.param == "sqlite":
        url = f"sqlite:///{root / 'fvb.db'}"
    else:
        server = request.getfixturevalue("postgres_server")
        url = create_database(server.url, f"dash_{uuid.uuid4().hex[:12]}")
    upgrade(url)
    return url


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def settings(request, tmp_path_factory, tiny_t2v, tiny_i2v) -> Settings:
    root: Path = tmp_path_factory.mktemp("dashboard")
    models_toml = root / "models.toml"
    models_toml.write_text(
        f'[models."{T2V}"]\npath = "{tiny_t2v}"\npool = "{T2V_POOL}"\n\n'
        f'[models."{I2V}"]\npath = "{tiny_i2v}"\npool = "{I2V_POOL}"\n'
    )
    closed = free_port()
    return Settings(
        database_url=database_url(request, root),
        broker_url=f"redis://127.0.0.1:{closed}/0",
        s3_endpoint_url=f"http://127.0.0.1:{closed}",
        s3_access_key="unused",
        s3_secret_key="unused",
        models_config=models_toml,
        heartbeat_timeout_s=60,
    )


@pytest.fixture(scope="module")
def client(settings) -> TestClient:
    return TestClient(create_app(settings))


@pytest.fixture(scope="module")
def keys(settings) -> dict[str, str]:
    with session_scope(settings.database_url) as session:
        return {
            tenant: create_api_key(session, tenant)
            for tenant in ("acme", "globex", "initech", "hooli")
        }


def bearer(keys, tenant) -> dict[str, str]:
    return {"Authorization": f"Bearer {keys[tenant]}"}


@pytest.fixture(scope="module", autouse=True)
def frozen_now():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("scheduler.api.dashboard_data.utcnow", lambda: NOW)
        yield


class History:
    """Builds job histories through the state machine, each step at a chosen time."""

    def __init__(self, url: str, clock: Clock) -> None:
        self.url = url
        self.clock = clock

    def _at(self, moment: datetime):
        self.clock.now = moment
        return session_scope(self.url)

    def create(self, tenant: str, created: datetime, model: str = T2V) -> str:
        with self._at(created) as session:
            job = Job(
                tenant=tenant,
                model=model,
                params={"prompt": "a lighthouse in a storm"},
                max_attempts=3,
                created_at=created,
                updated_at=created,
            )
            return transitions.create_job(session, job).id

    def claim(self, job_id: str, worker: str, at: datetime) -> int:
        with self._at(at) as session:
            return transitions.claim(session, job_id, worker).attempt

    def heartbeat(self, job_id: str, attempt: int, progress: int, at: datetime) -> None:
        with self._at(at) as session:
            assert transitions.heartbeat(session, job_id, attempt, progress).still_owner

    def succeed(self, job_id: str, attempt: int, at: datetime) -> None:
        with self._at(at) as session:
            key = f"videos/{job_id}/attempt-{attempt}.mp4"
            assert transitions.succeed(session, job_id, attempt, key, 10, "0" * 64)

    def fail(self, job_id: str, attempt: int, code: str, at: datetime) -> None:
        with self._at(at) as session:
            assert transitions.fail(session, job_id, attempt, code, f"{code} happened")

    def retry_later(self, job_id: str, attempt: int, code: str, at: datetime) -> None:
        with self._at(at) as session:
            assert transitions.retry_later(session, job_id, attempt, code, "try again")

    def cancel(self, job_id: str, at: datetime) -> str | None:
        with self._at(at) as session:
            return transitions.request_cancel(session, job_id)

    def delete(self, job_id: str, at: datetime) -> None:
        with self._at(at) as session:
            session.execute(update(Job).where(Job.id == job_id).values(deleted_at=at))

    def run(self, tenant: str, created: float, claimed: float, done: float, worker: str) -> str:
        """A job that succeeded: created, claimed and finished so many seconds ago."""
        job_id = self.create(tenant, ago(created))
        attempt = self.claim(job_id, worker, ago(claimed))
        self.succeed(job_id, attempt, ago(done))
        return job_id


@pytest.fixture(scope="module")
def jobs(settings, keys) -> dict[str, str]:
    """acme's history (13 listed jobs, one deleted) and a little of globex's."""
    clock = Clock()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("fvb_core.db.transitions.utcnow", clock)
        h = History(settings.database_url, clock)
        ids: dict[str, str] = {}
        # Succeeded: run times 100 s (3 h ago, outside every window), 40, 20 and 30 s.
        hours = 3 * 3600
        ids["old_ok"] = h.run("acme", hours, claimed=hours - 10, done=hours - 110, worker="w-1")
        ids["ok_a"] = h.run("acme", created=2400, claimed=1860, done=1820, worker="w-1")
        ids["ok_b"] = h.run("acme", created=540, claimed=510, done=490, worker="w-2")
        ids["ok_c"] = h.run("acme", created=360, claimed=330, done=300, worker="w-2")

        ids["failed"] = h.create("acme", ago(240))
        h.fail(ids["failed"], h.claim(ids["failed"], "w-2", ago(230)), "oom", ago(180))

        ids["retried"] = h.create("acme", ago(210))
        attempt = h.claim(ids["retried"], "w-3", ago(200))
        h.retry_later(ids["retried"], attempt, "storage_unavailable", ago(180))

        ids["cancelled"] = h.create("acme", ago(150))
        assert h.cancel(ids["cancelled"], ago(120)) == "cancelled"

        # Running: one whose worker went silent 110 s ago (past the 60 s timeout), two live.
        ids["stale"] = h.create("acme", ago(120))
        h.claim(ids["stale"], "w-dead", ago(110))
        ids["run_a"] = h.create("acme", ago(100))
        attempt = h.claim(ids["run_a"], "gpu-a", ago(90))
        h.heartbeat(ids["run_a"], attempt, 40, ago(2))
        ids["run_b"] = h.create("acme", ago(80))
        attempt = h.claim(ids["run_b"], "gpu-b", ago(70))
        h.heartbeat(ids["run_b"], attempt, 75, ago(5))
        assert h.cancel(ids["run_b"], ago(4)) == "running"

        ids["queued_1"] = h.create("acme", ago(60))
        ids["queued_2"] = h.create("acme", ago(30), model=I2V)
        ids["deleted"] = h.create("acme", ago(20))
        h.cancel(ids["deleted"], ago(19))
        h.delete(ids["deleted"], ago(18))
        ids["retired_model"] = h.create("acme", ago(10), model="retired-model")

        ids["g_queued"] = h.create("globex", ago(50))
        ids["g_ok"] = h.run("globex", created=200, claimed=190, done=100, worker="gpu-z")
        ids["g_run"] = h.create("globex", ago(45))
        attempt = h.claim(ids["g_run"], "gpu-z", ago(40))
        h.heartbeat(ids["g_run"], attempt, 10, ago(1))
    return ids


def data(client, keys, tenant="acme", **query) -> dict:
    response = client.get("/dashboard/data", params=query, headers=bearer(keys, tenant))
    assert response.status_code == 200, response.text
    return response.json()


# --- the page ----------------------------------------------------------------------------


def test_page_is_served_without_a_key_and_loads_nothing_from_elsewhere(client):
    response = client.get("/dashboard")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "<title>FastVideo Batch · dashboard</title>" in page
    assert re.findall(r"https?://", page) == []
    assert re.findall(r"<script[^>]*\ssrc=|<link[^>]*stylesheet|@import", page) == []
    # The key comes from the fragment, stays in this tab, and goes out as a Bearer header.
    for piece in ("location.hash", "sessionStorage", '"Bearer "', '"/data"'):
        assert piece in page


def test_page_content_security_policy_allows_exactly_its_inline_script_and_style(client):
    response = client.get("/dashboard")
    policy = response.headers["content-security-policy"]
    script = re.search(r"<script>(.*?)</script>", response.text, re.DOTALL).group(1)
    style = re.search(r"<style>(.*?)</style>", response.text, re.DOTALL).group(1)

    def digest(text: str) -> str:
        return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()

    assert f"script-src 'sha256-{digest(script)}';" in policy
    assert f"style-src 'sha256-{digest(style)}';" in policy
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy


# --- auth --------------------------------------------------------------------------------


def test_data_needs_a_valid_key(client, jobs):
    missing = client.get("/dashboard/data")
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = client.get("/dashboard/data", headers={"Authorization": "Bearer fvb-not-a-key"})
    assert wrong.status_code == 401
    assert "Incorrect API key" in wrong.json()["error"]["message"]


# --- the numbers -------------------------------------------------------------------------


def test_counts_pools_rates_and_run_times_are_exact(client, keys, jobs):
    body = data(client, keys)
    assert body["tenant"] == "acme"
    assert body["generated_at"] == int(NOW.timestamp())
    assert body["counts"] == {
        "queued": 4,  # retried, queued_1, queued_2, retired_model
        "in_progress": 3,  # stale, run_a, run_b
        "completed": 4,
        "failed": 2,  # failed + cancelled, as the API reports them
        "cancelled": 1,
        "total": 13,  # the deleted job is gone
    }
    assert body["pools"] == [
        {
            "pool": I2V_POOL,
            "queue": f"gpu.{I2V_POOL}",
            "queued": 1,
            "running": 0,
            "yours_queued": 1,
            "yours_running": 0,
        },
        {
            "pool": T2V_POOL,
            "queue": f"gpu.{T2V_POOL}",
            "queued": 3,  # globex's queued job counts, without saying whose it is
            "running": 4,
            "yours_queued": 2,
            "yours_running": 3,
        },
        {
            "pool": "unknown",
            "queue": "gpu.unknown",
            "queued": 1,
            "running": 0,
            "yours_queued": 1,
            "yours_running": 0,
        },
    ]
    assert body["throughput"] == [
        {"window_minutes": 10, "completed": 2, "per_minute": 0.2},
        {"window_minutes": 60, "completed": 3, "per_minute": 0.05},
    ]
    # Run times 40, 20 and 30 s in the last hour: median 30, p95 interpolated 30 + 0.9 * 10.
    assert body["run_time"] == {"window_minutes": 60, "samples": 3, "median_s": 30.0, "p95_s": 39.0}


def test_workers_are_those_heartbeating_for_the_tenants_running_jobs(client, keys, jobs):
    body = data(client, keys)
    assert body["heartbeat_timeout_s"] == 60
    assert body["workers"] == [
        {
            "worker_id": "gpu-a",
            "heartbeat_at": int(ago(2).timestamp()),
            "jobs": [
                {
                    "id": jobs["run_a"],
                    "model": T2V,
                    "progress": 40,
                    "attempt": 1,
                    "started_at": int(ago(90).timestamp()),
                    "heartbeat_at": int(ago(2).timestamp()),
                    "cancel_requested": False,
                }
            ],
        },
        {
            "worker_id": "gpu-b",
            "heartbeat_at": int(ago(5).timestamp()),
            "jobs": [
                {
                    "id": jobs["run_b"],
                    "model": T2V,
                    "progress": 75,
                    "attempt": 1,
                    "started_at": int(ago(70).timestamp()),
                    "heartbeat_at": int(ago(5).timestamp()),
                    "cancel_requested": True,
                }
            ],
        },
    ]
    # w-dead is past the timeout; gpu-z runs globex's job: counted, not shown.
    assert body["live_workers_all_tenants"] == 3


def test_table_lists_newest_first_with_api_statuses_and_durations(client, keys, jobs):
    body = data(client, keys)
    rows = [
        (
            row["id"],
            row["model"],
            row["status"],
            row["state"],
            row["progress"],
            row["attempt"],
            row["duration_s"],
            row["error_code"],
        )
        for row in body["jobs"]
    ]
    assert rows == [
        (jobs["retired_model"], "retired-model", "queued", "queued", 0, 0, None, None),
        (jobs["queued_2"], I2V, "queued", "queued", 0, 0, None, None),
        (jobs["queued_1"], T2V, "queued", "queued", 0, 0, None, None),
        (jobs["run_b"], T2V, "in_progress", "running", 75, 1, 70.0, None),
        (jobs["run_a"], T2V, "in_progress", "running", 40, 1, 90.0, None),
        (jobs["stale"], T2V, "in_progress", "running", 0, 1, 110.0, None),
        (jobs["cancelled"], T2V, "failed", "cancelled", 0, 0, None, "cancelled"),
        (jobs["retried"], T2V, "queued", "queued", 0, 1, None, "storage_unavailable"),
        (jobs["failed"], T2V, "failed", "failed", 0, 1, 50.0, "oom"),
        (jobs["ok_c"], T2V, "completed", "succeeded", 100, 1, 30.0, None),
        (jobs["ok_b"], T2V, "completed", "succeeded", 100, 1, 20.0, None),
        (jobs["ok_a"], T2V, "completed", "succeeded", 100, 1, 40.0, None),
        (jobs["old_ok"], T2V, "completed", "succeeded", 100, 1, 100.0, None),
    ]
    first_run = next(row for row in body["jobs"] if row["id"] == jobs["run_b"])
    assert first_run == {
        "id": jobs["run_b"],
        "model": T2V,
        "status": "in_progress",
        "state": "running",
        "progress": 75,
        "attempt": 1,
        "max_attempts": 3,
        "created_at": int(ago(80).timestamp()),
        "started_at": int(ago(70).timestamp()),
        "finished_at": None,
        "heartbeat_at": int(ago(5).timestamp()),
        "duration_s": 70.0,
        "error_code": None,
        "cancel_requested": True,
        "worker_id": "gpu-b",
    }


@pytest.mark.parametrize(
    ("status", "names"),
    [
        ("queued", ["retired_model", "queued_2", "queued_1", "retried"]),
        ("in_progress", ["run_b", "run_a", "stale"]),
        ("completed", ["ok_c", "ok_b", "ok_a", "old_ok"]),
        ("failed", ["cancelled", "failed"]),
        ("cancelled", ["cancelled"]),
    ],
)
def test_status_filter_narrows_the_table_only(client, keys, jobs, status, names):
    body = data(client, keys, status=status)
    assert body["status_filter"] == status
    assert [row["id"] for row in body["jobs"]] == [jobs[name] for name in names]
    assert body["counts"]["total"] == 13


def test_unknown_status_filter_is_rejected_naming_the_field(client, keys, jobs):
    response = client.get(
        "/dashboard/data", params={"status": "running"}, headers=bearer(keys, "acme")
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("status", "invalid_value")
    assert "in_progress" in error["message"]


def test_another_tenant_sees_only_its_own_jobs_and_workers(client, keys, jobs):
    acme_text = client.get("/dashboard/data", headers=bearer(keys, "acme")).text
    for name in ("g_queued", "g_ok", "g_run"):
        assert jobs[name] not in acme_text
    assert "gpu-z" not in acme_text and "globex" not in acme_text

    body = data(client, keys, tenant="globex")
    assert body["counts"] == {
        "queued": 1,
        "in_progress": 1,
        "completed": 1,
        "failed": 0,
        "cancelled": 0,
        "total": 3,
    }
    assert [row["id"] for row in body["jobs"]] == [jobs["g_run"], jobs["g_queued"], jobs["g_ok"]]
    assert [w["worker_id"] for w in body["workers"]] == ["gpu-z"]
    assert body["run_time"]["samples"] == 1 and body["run_time"]["median_s"] == 90.0
    t2v = next(pool for pool in body["pools"] if pool["pool"] == T2V_POOL)
    assert (t2v["queued"], t2v["yours_queued"], t2v["running"], t2v["yours_running"]) == (
        3,
        1,
        4,
        1,
    )
    assert body["live_workers_all_tenants"] == 3
    assert not any(job_id in str(body) for name, job_id in jobs.items() if name[:2] != "g_")


def test_table_holds_the_newest_50_in_the_same_few_queries(client, keys, settings, jobs):
    """However many jobs a tenant has, one request is the key lookup plus eight queries."""
    engine = get_engine(settings.database_url)
    statements: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        data(client, keys, tenant="initech")
        few = len(statements)
        with session_scope(settings.database_url) as session:
            for i in range(55):
                created = ago(1000 - i)
                job = Job(
                    tenant="initech",
                    model=T2V,
                    params={"prompt": f"shot {i}"},
                    created_at=created,
                    updated_at=created,
                )
                transitions.create_job(session, job)
        statements.clear()
        body = data(client, keys, tenant="initech")
    finally:
        event.remove(engine, "before_cursor_execute", count)
        with session_scope(settings.database_url) as session:  # keep the pool totals exact
            session.execute(delete(Job).where(Job.tenant == "initech"))
    assert len(statements) == few == 9
    assert len(body["jobs"]) == 50
    assert body["counts"]["queued"] == 55
    created = [row["created_at"] for row in body["jobs"]]
    assert created == sorted(created, reverse=True)
    assert created[-1] == int(ago(1000 - 5).timestamp())  # the 5 oldest are left out


def test_deleted_videos_leave_the_table_but_still_count_as_work_done(client, keys, settings):
    clock = Clock()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("fvb_core.db.transitions.utcnow", clock)
        history = History(settings.database_url, clock)
        job_id = history.run("umbrella", created=100, claimed=90, done=60, worker="w-u")
        history.delete(job_id, ago(30))
    with session_scope(settings.database_url) as session:
        key = create_api_key(session, "umbrella")
    response = client.get("/dashboard/data", headers={"Authorization": f"Bearer {key}"})
    body = response.json()
    assert (body["counts"]["total"], body["jobs"]) == (0, [])
    assert body["throughput"][0] == {"window_minutes": 10, "completed": 1, "per_minute": 0.1}
    assert body["run_time"]["samples"] == 1 and body["run_time"]["median_s"] == 30.0


def test_batches_show_newest_first_with_their_videos_by_state(client, keys, settings):
    """The tenant's batches as GET /v1/batches/{id} shows them: status from the videos
    (deleted ones not counted), metadata, newest first; nobody else's."""
    clock = Clock()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("fvb_core.db.transitions.utcnow", clock)
            h = History(settings.database_url, clock)
            with session_scope(settings.database_url) as session:
                session.add_all([
                    Batch(id="batch_old", tenant="hooli", created_at=ago(500), updated_at=ago(500),
                          params={"metadata": {"dataset": "pandas-v1"}}),
                    Batch(id="batch_new", tenant="hooli", status="cancelled",
                          created_at=ago(100), updated_at=ago(100)),
                    Batch(id="batch_empty", tenant="hooli", created_at=ago(300),
                          updated_at=ago(300)),
                    Batch(id="batch_globex", tenant="globex", created_at=ago(50),
                          updated_at=ago(50)),
                ])  # fmt: skip
            members = {
                "batch_old": [
                    h.run("hooli", created=450, claimed=440, done=400, worker="w"),
                    h.create("hooli", ago(440)),
                    h.create("hooli", ago(430)),
                ],
                "batch_new": [h.create("hooli", ago(90)), h.create("hooli", ago(80))],
            }
            h.delete(members["batch_old"][2], ago(20))
            h.cancel(members["batch_new"][0], ago(60))
            h.claim(members["batch_new"][1], "w", ago(50))
            h.cancel(members["batch_new"][1], ago(40))  # running: cancelled at its next step
            with session_scope(settings.database_url) as session:
                for batch_id, job_ids in members.items():
                    session.execute(
                        update(Job).where(Job.id.in_(job_ids)).values(batch_id=batch_id)
                    )
        batches = data(client, keys, tenant="hooli")["batches"]
        assert [b["id"] for b in batches] == ["batch_new", "batch_empty", "batch_old"]
        new, empty, old = batches
        assert new["status"] == "cancelling"
        assert new["request_counts"] == {
            "total": 2, "queued": 0, "in_progress": 1, "completed": 0, "failed": 0,
            "cancelled": 1,
        }  # fmt: skip
        assert empty["status"] == "in_progress" and empty["request_counts"]["total"] == 0
        assert old["status"] == "in_progress"
        assert old["metadata"] == {"dataset": "pandas-v1"}
        assert old["created_at"] == int(ago(500).timestamp())
        assert old["request_counts"] == {
            "total": 2, "queued": 1, "in_progress": 0, "completed": 1, "failed": 0,
            "cancelled": 0,
        }  # fmt: skip
        assert [b["id"] for b in data(client, keys, tenant="globex")["batches"]] == ["batch_globex"]
    finally:  # keep the other tests' pool totals exact
        with session_scope(settings.database_url) as session:
            session.execute(delete(Job).where(Job.tenant == "hooli"))
            session.execute(delete(Batch))
