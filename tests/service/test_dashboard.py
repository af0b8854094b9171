"""The monitoring dashboard: the static page, and ``/dashboard/data`` computed from jobs put
into a migrated database (SQLite, then a real PostgreSQL) through the real state machine
(``fvb_core.db.transitions``) on a fake clock, so every count, duration and percentile is
known exactly.

Storage and broker are not needed here (the dashboard reads only the database): the app is
built against closed loopback ports for both, as in the readiness tests of test_api.py.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, event, func, select, update

from fvb_core.api_keys import create_api_key, hash_key
from fvb_core.db import transitions
from fvb_core.db.migrate import upgrade
from fvb_core.db.models import ApiKey, Batch, Job, Worker, utcnow
from fvb_core.db.session import get_engine, session_scope
from fvb_core.settings import Settings
from fvb_tools.localstack.ports import free_port
from fvb_tools.localstack.postgres import create_database
from scheduler.api.app import create_app
from scheduler.api.dashboard_links import parse_range
from scheduler.api.errors import ApiError

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
            assert transitions.hide(session, job_id, None)  # the API's delete

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
    # Its script and style are the package's own, next to it; nothing from elsewhere.
    assert re.findall(r'<script[^>]*\ssrc="([^"]*)"', page) == ["dashboard/assets/dashboard.js"]
    assert re.findall(r'<link rel="stylesheet" href="([^"]*)"', page) == [
        "dashboard/assets/dashboard.css"
    ]
    script = client.get("/dashboard/assets/dashboard.js")
    style = client.get("/dashboard/assets/dashboard.css")
    assert script.headers["content-type"].startswith("text/javascript")
    assert style.headers["content-type"].startswith("text/css")
    assert script.headers["x-content-type-options"] == "nosniff"
    for text in (page, script.text, style.text):  # (SVG's namespace is a name, not a load)
        assert re.findall(r"https?://(?!www\.w3\.org/2000/svg\b)", text) == []
        assert "@import" not in text and "innerHTML" not in text and "eval(" not in text
    # The key comes from the fragment, stays in this tab, and goes out as a Bearer header.
    for piece in ("location.hash", "sessionStorage", '"Bearer "', '"/data"'):
        assert piece in script.text
    assert client.get("/dashboard/assets/nope.js").status_code == 404


def test_page_content_security_policy_allows_only_this_origin(client):
    policy = client.get("/dashboard").headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives == {
        "default-src": "'none'",
        "script-src": "'self'",
        "style-src": "'self'",
        "connect-src": "'self'",
        "media-src": "'self'",  # the <video> streams from /dashboard/media/...
        "img-src": "'self' data:",
        "base-uri": "'none'",
        "form-action": "'none'",
        "frame-ancestors": "'none'",
    }
    assert "inline" not in policy and "eval" not in policy


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
        "tenant": "acme",
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
    """However many jobs a tenant has, one request is the key lookup plus 12 queries (the
    roll-ups and their pending events, index ranges, bounded selects)."""
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
    assert len(statements) == few <= 13  # the fleet adds its reads only when workers beat
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


# --- the console's routes: /dashboard/jobs, one job, its actions, signed links -----------
#
# Their own tenants (wayne, stark) and an operator key, so the numbers above stay exact; the
# fixture removes what it made.


class Console:
    def __init__(self, url: str, clock: Clock) -> None:
        self.history = History(url, clock)
        self.ids: dict[str, str] = {}
        self.keys: dict[str, str] = {}

    def make(self, name, tenant, created, prompt, model=T2V, batch_id=None) -> str:
        with self.history._at(ago(created)) as session:
            job = Job(
                tenant=tenant,
                model=model,
                params={"prompt": prompt, "seed": 7, "num_frames": 9, "fps": 8},
                max_attempts=3,
                batch_id=batch_id,
                created_at=ago(created),
                updated_at=ago(created),
            )
            self.ids[name] = transitions.create_job(session, job).id
        return self.ids[name]


@pytest.fixture(scope="module")
def console(settings):
    clock = Clock()
    url = settings.database_url
    c = Console(url, clock)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("fvb_core.db.transitions.utcnow", clock)
        patch.setattr("scheduler.api.dashboard_jobs.utcnow", lambda: NOW)
        with session_scope(url) as session:
            c.keys = {
                "wayne": create_api_key(session, "wayne"),
                "stark": create_api_key(session, "stark"),
                "ops": create_api_key(session, "ops", operator=True),
            }
            session.add(Batch(id="batch_wayne", tenant="wayne", created_at=ago(990),
                              updated_at=ago(990)))  # fmt: skip
        h = c.history
        # wayne: newest first w_q2, w_q1, w_cancelled, w_failed, w_run, w_ok (in its batch).
        c.make("w_ok", "wayne", 900, "A Red Panda in the snow", batch_id="batch_wayne")
        attempt = h.claim(c.ids["w_ok"], "w-1", ago(890))
        with h._at(ago(850)) as session:
            assert transitions.succeed(
                session, c.ids["w_ok"], attempt, "videos/x/attempt-1.mp4", 1234, "ab" * 32,
                stage_timings={"text_encode": 1.5, "denoise": 30.25, "decode": 4.0},
                result={"frames": 9, "fps": 8, "width": 64, "height": 64},
            )  # fmt: skip
        c.make("w_run", "wayne", 800, "waves on a rocky shore", batch_id="batch_wayne")
        h.claim(c.ids["w_run"], "w-2", ago(790))
        c.make("w_failed", "wayne", 700, "a panda eating 100% bamboo", model=I2V)
        h.fail(c.ids["w_failed"], h.claim(c.ids["w_failed"], "w-1", ago(690)), "oom", ago(680))
        c.make("w_cancelled", "wayne", 600, "a lighthouse at dusk")
        h.cancel(c.ids["w_cancelled"], ago(590))
        c.make("w_q1", "wayne", 500, "pandas_v2 dataset shot")
        c.make("w_q2", "wayne", 400, "city lights at night")
        c.make("s_q", "stark", 450, "an iron suit, red and gold")
        c.make("s_failed", "stark", 350, "a panda in armour")
        h.fail(c.ids["s_failed"], h.claim(c.ids["s_failed"], "w-3", ago(340)), "oom", ago(330))
        yield c
    with session_scope(url) as session:
        session.execute(delete(Job).where(Job.tenant.in_(("wayne", "stark"))))
        session.execute(delete(Batch).where(Batch.id == "batch_wayne"))


def as_(console, who) -> dict[str, str]:
    return {"Authorization": f"Bearer {console.keys[who]}"}


def listed(client, console, who="wayne", **query) -> dict:
    response = client.get("/dashboard/jobs", params=query, headers=as_(console, who))
    assert response.status_code == 200, response.text
    return response.json()


def names(console, body) -> list[str]:
    by_id = {job_id: name for name, job_id in console.ids.items()}
    return [by_id.get(row["id"], row["id"]) for row in body["data"]]


WAYNE_NEWEST_FIRST = ["w_q2", "w_q1", "w_cancelled", "w_failed", "w_run", "w_ok"]


def test_me_says_whose_key_it_is(client, console):
    assert client.get("/dashboard/me", headers=as_(console, "wayne")).json() == {
        "tenant": "wayne",
        "operator": False,
    }
    assert client.get("/dashboard/me", headers=as_(console, "ops")).json() == {
        "tenant": "ops",
        "operator": True,
    }
    assert client.get("/dashboard/me").status_code == 401


def test_fleet_is_scoped_by_the_keys_role(client, console, settings):
    with session_scope(settings.database_url) as session:
        session.add(Worker(id="wk-idle", pool="default", host="h1", pid=1, heartbeat_at=utcnow()))
    try:
        tenant = client.get("/dashboard/fleet", headers=as_(console, "wayne")).json()
        operator = client.get("/dashboard/fleet", headers=as_(console, "ops")).json()
    finally:
        with session_scope(settings.database_url) as session:
            session.execute(delete(Worker).where(Worker.id == "wk-idle"))
    # An idle worker runs none of wayne's jobs; an operator sees it.
    assert (tenant["scope"], tenant["fleet"]) == ("wayne", [])
    assert operator["scope"] is None
    assert [w["worker_id"] for w in operator["fleet"]] == ["wk-idle"]
    assert operator["fleet"][0]["current_job"] is None


def test_jobs_list_is_the_tenants_own_newest_first(client, console):
    body = listed(client, console)
    assert names(console, body) == WAYNE_NEWEST_FIRST
    assert (body["has_more"], body["next_cursor"], body["truncated_scan"]) == (False, None, False)
    assert body["scope"] == "wayne"
    row = body["data"][3]
    assert row == {
        "id": console.ids["w_failed"],
        "tenant": "wayne",
        "model": I2V,
        "status": "failed",
        "state": "failed",
        "progress": 0,
        "attempt": 1,
        "max_attempts": 3,
        "batch_id": None,
        "prompt": "a panda eating 100% bamboo",
        "created_at": int(ago(700).timestamp()),
        "started_at": int(ago(690).timestamp()),
        "finished_at": int(ago(680).timestamp()),
        "duration_s": 10.0,
        "error_code": "oom",
        "cancel_requested": False,
        "worker_id": "w-1",
    }
    running = body["data"][4]
    assert (running["state"], running["duration_s"]) == ("running", 790.0)


def test_jobs_cursor_pages_cover_the_list_once_in_order(client, console):
    seen, cursor, pages = [], None, 0
    while True:
        body = listed(client, console, limit=4, **({"cursor": cursor} if cursor else {}))
        seen += names(console, body)
        pages += 1
        if not body["has_more"]:
            assert body["next_cursor"] is None
            break
        cursor = body["next_cursor"]
    assert seen == WAYNE_NEWEST_FIRST and pages == 2
    # A job created after the first page does not shift the second.
    first = listed(client, console, limit=3)
    console.make("w_late", "wayne", 10, "a late arrival")
    try:
        second = listed(client, console, limit=3, cursor=first["next_cursor"])
        assert names(console, second) == ["w_failed", "w_run", "w_ok"]
    finally:
        with session_scope(console.history.url) as session:
            session.execute(delete(Job).where(Job.id == console.ids.pop("w_late")))


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"state": "queued"}, ["w_q2", "w_q1"]),
        ({"state": "failed,cancelled"}, ["w_cancelled", "w_failed"]),
        ({"state": "succeeded"}, ["w_ok"]),
        ({"model": I2V}, ["w_failed"]),
        ({"batch_id": "batch_wayne"}, ["w_run", "w_ok"]),
        ({"batch_id": "batch_wayne", "state": "running"}, ["w_run"]),
        ({"created_after": int(ago(650).timestamp())}, ["w_q2", "w_q1", "w_cancelled"]),
        ({"created_before": int(ago(650).timestamp())}, ["w_failed", "w_run", "w_ok"]),
        ({"q": "PANDA"}, ["w_q1", "w_failed", "w_ok"]),  # case-insensitive substring
        ({"q": "100%"}, ["w_failed"]),  # LIKE's wildcards are the text's own characters
        ({"q": "s_v"}, ["w_q1"]),
        ({"q": "panda", "state": "queued"}, ["w_q1"]),
        ({"q": "nothing like it"}, []),
    ],
)
def test_jobs_filters(client, console, query, expected):
    assert names(console, listed(client, console, **query)) == expected


def test_a_tenant_never_sees_another_tenants_jobs(client, console):
    body = listed(client, console, who="stark")
    assert names(console, body) == ["s_failed", "s_q"]
    assert names(console, listed(client, console, who="stark", q="panda")) == ["s_failed"]
    refused = client.get(
        "/dashboard/jobs", params={"tenant": "wayne"}, headers=as_(console, "stark")
    )
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "operator_key_required"
    # Its own name as the filter is allowed (and changes nothing).
    assert names(console, listed(client, console, who="stark", tenant="stark")) == [
        "s_failed",
        "s_q",
    ]


def test_an_operator_sees_every_tenant_and_may_pick_one(client, console):
    body = listed(client, console, who="ops", q="panda")
    assert body["scope"] is None
    assert names(console, body) == ["s_failed", "w_q1", "w_failed", "w_ok"]
    assert {row["tenant"] for row in body["data"]} == {"wayne", "stark"}
    assert names(console, listed(client, console, who="ops", tenant="stark")) == ["s_failed", "s_q"]
    assert names(console, listed(client, console, who="ops", tenant="wayne", state="failed")) == [
        "w_failed"
    ]


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"state": "in_progress"}, "state"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"q": "x" * 201}, "q"),
        ({"created_after": 10**13}, "created_after"),
    ],
)
def test_jobs_list_rejects_bad_parameters_naming_them(client, console, query, param):
    response = client.get("/dashboard/jobs", params=query, headers=as_(console, "wayne"))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_search_looks_at_a_bounded_window_and_says_where_to_go_on(client, console, monkeypatch):
    """Filters no index serves read at most SCAN_LIMIT rows of the index walk per request;
    a page that stopped at that bound says so, and its cursor searches on from there."""
    monkeypatch.setattr("scheduler.api.dashboard_jobs.SCAN_LIMIT", 2)
    found, cursor, requests = [], None, 0
    while True:
        body = listed(client, console, q="panda", **({"cursor": cursor} if cursor else {}))
        requests += 1
        found += names(console, body)
        assert body["scan_limit"] == 2
        if not body["has_more"]:
            break
        cursor = body["next_cursor"]
    # 6 jobs, 2 looked at per request: w_q2 w_q1 | w_cancelled w_failed | w_run w_ok | (end)
    assert found == ["w_q1", "w_failed", "w_ok"] and requests == 4
    first = listed(client, console, q="nothing like it")
    assert (first["data"], first["truncated_scan"], first["has_more"]) == ([], True, True)
    # Without a filter of that kind the page is exact: no scan bound, no truncation.
    plain = listed(client, console, limit=3)
    assert plain["truncated_scan"] is False and len(plain["data"]) == 3


def test_search_is_one_bounded_statement(client, console, settings):
    """A full page is one SELECT over a LIMITed walk of the index (besides the key lookup);
    a page the matches do not fill costs one more, as bounded, to find where the walk
    stopped."""
    engine = get_engine(settings.database_url)
    statements: list[str] = []

    def record(_conn, _cursor, statement, *_args) -> None:
        if "FROM jobs" in statement:
            statements.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", record)
    try:
        listed(client, console, q="panda", limit=1)  # 3 matches: the page is full
        full = list(statements)
        statements.clear()
        listed(client, console, q="panda", state="queued", limit=5)  # 1 match
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert len(full) == 1
    assert full[0].count("LIMIT") == 2  # the window's bound and the page's
    assert "ORDER BY jobs.created_at DESC, jobs.id DESC LIMIT" in full[0]
    assert len(statements) == 2
    assert re.search(
        r"ORDER BY jobs.created_at DESC, jobs.id DESC LIMIT \S+ OFFSET \S+$", statements[1]
    )


def job(client, console, name, who="wayne"):
    return client.get(f"/dashboard/jobs/{console.ids[name]}", headers=as_(console, who))


def test_job_page_has_everything_about_one_job(client, console):
    response = job(client, console, "w_ok")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["prompt"] == "A Red Panda in the snow"
    assert body["params"] == {"prompt": "A Red Panda in the snow", "seed": 7, "num_frames": 9,
                              "fps": 8}  # fmt: skip
    assert body["stage_timings"] == {"text_encode": 1.5, "denoise": 30.25, "decode": 4.0}
    assert body["result"] == {"frames": 9, "fps": 8, "width": 64, "height": 64}
    assert (body["state"], body["status"], body["attempt"], body["worker_id"]) == (
        "succeeded", "completed", 1, "w-1",
    )  # fmt: skip
    assert (body["queue_wait_s"], body["duration_s"]) == (10.0, 40.0)
    assert body["output"] == {
        "uri": "s3://fvb-videos/videos/x/attempt-1.mp4", "bytes": 1234, "sha256": "ab" * 32,
    }  # fmt: skip
    assert body["batch_id"] == "batch_wayne"
    assert [(e["from_status"], e["to_status"], e["attempt"]) for e in body["events"]] == [
        (None, "queued", 0),
        ("queued", "running", 1),
        ("running", "succeeded", 1),
    ]
    assert body["events"][1]["at"] == ago(890).timestamp()
    assert body["actions"] == {"cancel": False, "retry": False, "delete": True, "play": True}

    failed = job(client, console, "w_failed").json()
    assert (failed["error_code"], failed["error_message"]) == ("oom", "oom happened")
    assert failed["actions"] == {"cancel": False, "retry": True, "delete": True, "play": False}
    queued = job(client, console, "w_q1").json()
    assert queued["actions"] == {"cancel": True, "retry": False, "delete": True, "play": False}


def test_job_page_is_404_for_another_tenants_job_but_an_operator_sees_it(client, console):
    response = job(client, console, "s_q")  # wayne's key, stark's job
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    seen = job(client, console, "s_q", who="ops")
    assert seen.status_code == 200 and seen.json()["tenant"] == "stark"


def act(client, console, name, action, who="wayne"):
    return client.post(f"/dashboard/jobs/{console.ids[name]}/{action}", headers=as_(console, who))


def state_of(settings, job_id) -> tuple[str, int, int]:
    with session_scope(settings.database_url) as session:
        row = session.get(Job, job_id)
        return row.status, row.attempt, row.max_attempts


def test_actions_refuse_what_they_cannot_do(client, console):
    cases = [
        ("w_q1", "retry", 409, "video_not_retryable"),  # queued: nothing to retry
        ("w_run", "retry", 409, "video_not_retryable"),
        ("w_ok", "retry", 409, "video_not_retryable"),
        ("w_ok", "cancel", 409, "video_finished"),
        ("w_failed", "cancel", 409, "video_finished"),
        ("s_q", "cancel", 404, "not_found"),  # another tenant's
        ("s_failed", "retry", 404, "not_found"),
        ("s_q", "delete", 404, "not_found"),
    ]
    for name, action, status, code in cases:
        response = act(client, console, name, action)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), (
            name,
            action,
            response.text,
        )
    assert client.post(f"/dashboard/jobs/{console.ids['w_q1']}/cancel").status_code == 401
    missing = client.post("/dashboard/jobs/video_nope/retry", headers=as_(console, "ops"))
    assert missing.status_code == 404


def test_cancel_and_retry_change_the_database(client, console, settings):
    c = console
    c.make("w_act", "wayne", 300, "to be cancelled, then retried")
    response = act(client, c, "w_act", "cancel")
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "cancelled"
    assert state_of(settings, c.ids["w_act"]) == ("cancelled", 0, 3)
    # A cancelled video comes back as a new attempt with job_max_attempts more attempts.
    response = act(client, c, "w_act", "retry")
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "queued" and response.json()["error_code"] is None
    assert state_of(settings, c.ids["w_act"]) == ("queued", 0, 3)
    events = [(e["from_status"], e["to_status"], e["detail"]) for e in response.json()["events"]]
    assert events[-1] == ("cancelled", "queued", "retry")
    # A failed one: attempt 1 was used, so it may now go to 1 + 3.
    response = act(client, c, "w_failed", "retry")
    assert response.status_code == 200, response.text
    assert state_of(settings, c.ids["w_failed"]) == ("queued", 1, 4)
    assert act(client, c, "w_failed", "retry").status_code == 409  # queued now


def test_an_operator_acts_on_another_tenants_job(client, console, settings):
    c = console
    response = act(client, c, "s_failed", "retry", who="ops")
    assert response.status_code == 200, response.text
    assert state_of(settings, c.ids["s_failed"])[0] == "queued"
    response = act(client, c, "s_failed", "cancel", who="ops")
    assert response.status_code == 200 and response.json()["state"] == "cancelled"


def test_retry_is_admitted_like_a_new_video(client, console, settings):
    c = console
    with session_scope(settings.database_url) as session:
        c.keys["full"] = create_api_key(session, "wayne", max_queued=1)
    c.make("w_full", "wayne", 250, "one more failure")
    h = c.history
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("fvb_core.db.transitions.utcnow", h.clock)
        h.fail(c.ids["w_full"], h.claim(c.ids["w_full"], "w-9", ago(240)), "oom", ago(230))
    response = act(client, c, "w_full", "retry", who="full")  # wayne has queued jobs already
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "queue_full"
    assert "retry-after" in response.headers
    assert state_of(settings, c.ids["w_full"])[0] == "failed"


def test_delete_hides_the_job_once_its_files_are_gone(client, console, settings):
    c = console
    c.make("w_del", "wayne", 200, "to be deleted")
    context = client.app.state.context
    deleted: list[str] = []
    # The store is not reachable from this module: the delete says so and keeps the job...
    response = act(client, c, "w_del", "delete")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "storage_unavailable"
    assert job(client, c, "w_del").status_code == 200
    # ... and with a store that answers, the job leaves every list (an operator's delete).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(context, "try_ensure_bucket", lambda: True)
        patch.setattr(context.store, "delete_job", lambda job_id: deleted.append(job_id) or [])
        response = act(client, c, "w_del", "delete", who="ops")
    assert response.status_code == 200, response.text
    assert response.json() == {"id": c.ids["w_del"], "deleted": True}
    assert deleted == [c.ids["w_del"]]
    assert job(client, c, "w_del").status_code == 404
    assert "w_del" not in names(c, listed(client, c))
    with session_scope(settings.database_url) as session:
        row = session.get(Job, c.ids["w_del"])
        assert row.status == "cancelled" and row.deleted_at is not None


# --- signed links for <video src> and the manifest download ------------------------------


def media_link(client, console, name, who="wayne"):
    return client.post(f"/dashboard/jobs/{console.ids[name]}/media", headers=as_(console, who))


def test_media_link_is_signed_for_the_key_and_checked_at_every_use(client, console, settings):
    response = media_link(client, console, "w_ok")
    assert response.status_code == 200, response.text
    link = response.json()
    assert link["url"].startswith(f"/dashboard/media/{console.ids['w_ok']}?k=key_")
    assert 0 < link["expires_at"] - time.time() <= 900
    # The link needs no header; the store being down here is the only thing in its way.
    served = client.get(link["url"])
    assert served.status_code == 503 and served.json()["error"]["code"] == "storage_unavailable"

    tampered = link["url"].replace("sig=", "sig=0")
    assert client.get(tampered).status_code == 403
    other = link["url"].replace(console.ids["w_ok"], console.ids["w_run"])
    assert client.get(other).json()["error"]["code"] == "invalid_signature"
    bare = client.get(f"/dashboard/media/{console.ids['w_ok']}")
    assert bare.status_code == 403
    with pytest.MonkeyPatch.context() as patch:
        later = time.time() + 901
        patch.setattr("scheduler.api.dashboard_links.time.time", lambda: later)
        expired = client.get(link["url"])
    assert expired.status_code == 403 and expired.json()["error"]["code"] == "link_expired"
    # A revoked key's links stop working at once.
    with session_scope(settings.database_url) as session:
        session.execute(
            update(ApiKey)
            .where(ApiKey.key_hash == hash_key(console.keys["wayne"]))
            .values(revoked_at=NOW)
        )
    try:
        assert client.get(link["url"]).json()["error"]["code"] == "invalid_signature"
    finally:
        with session_scope(settings.database_url) as session:
            session.execute(
                update(ApiKey)
                .where(ApiKey.key_hash == hash_key(console.keys["wayne"]))
                .values(revoked_at=None)
            )


def test_media_link_only_for_a_completed_video_the_key_sees(client, console):
    assert media_link(client, console, "w_run").json()["error"]["code"] == "video_not_ready"
    assert media_link(client, console, "w_cancelled").json()["error"]["code"] == "video_failed"
    assert media_link(client, console, "s_q").status_code == 404
    assert media_link(client, console, "w_ok", who="stark").status_code == 404
    assert media_link(client, console, "w_ok", who="ops").status_code == 200


def test_manifest_link_for_the_tenants_batch(client, console):
    path = "/dashboard/batches/batch_wayne/manifest"
    assert client.post(path, headers=as_(console, "stark")).status_code == 404
    response = client.post(path, headers=as_(console, "wayne"))
    assert response.status_code == 200, response.text
    url = response.json()["url"]
    assert url.startswith("/dashboard/batches/batch_wayne/manifest.jsonl?k=key_")
    served = client.get(url)
    assert served.status_code == 200
    assert served.headers["content-type"].startswith("application/x-ndjson")
    assert "attachment" in served.headers["content-disposition"]
    rows = [json.loads(line) for line in served.text.splitlines()]
    assert sorted(r["video_id"] for r in rows) == sorted(
        [console.ids["w_ok"], console.ids["w_run"]]
    )
    # A video's link is not a manifest's.
    assert (
        client.get(url.replace("batches/batch_wayne/manifest.jsonl", "media/x")).status_code == 403
    )


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-", (0, 99)),
        ("bytes=10-19", (10, 19)),
        ("bytes=90-500", (90, 99)),
        ("bytes=-10", (90, 99)),
        ("bytes=0-1,5-6", None),  # several ranges: the whole object
        ("items=0-1", None),
    ],
)
def test_range_header(header, expected):
    assert parse_range(header, 100) == expected


def test_range_outside_the_video_is_416():
    with pytest.raises(ApiError) as caught:
        parse_range("bytes=100-", 100)
    assert caught.value.status == 416
    assert caught.value.headers == {"Content-Range": "bytes */100"}


def test_an_operator_key_sees_every_tenant_on_the_overview(client, settings, jobs):
    with session_scope(settings.database_url) as session:
        key = create_api_key(session, "ops-overview", operator=True)
    response = client.get("/dashboard/data", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["every_tenant"] is True
    with session_scope(settings.database_url) as session:
        listed = session.execute(
            select(func.count()).select_from(Job).where(Job.deleted_at.is_(None))
        ).scalar_one()
    assert body["counts"]["total"] == listed
    shown = {row["id"]: row["tenant"] for row in body["jobs"]}
    assert shown[jobs["g_queued"]] == "globex" and shown[jobs["ok_c"]] == "acme"
    assert all(pool["yours_queued"] == pool["queued"] for pool in body["pools"])


def test_an_operator_acts_on_another_tenants_batch(client, console, settings):
    with session_scope(settings.database_url) as session:
        session.add(Batch(id="batch_stark_ops", tenant="stark"))
        session.flush()
        job = Job(tenant="stark", model=T2V, params={"prompt": "p"}, batch_id="batch_stark_ops")
        job_id = transitions.create_job(session, job).id
    ops = {"Authorization": f"Bearer {console.keys['ops']}"}
    wayne = {"Authorization": f"Bearer {console.keys['wayne']}"}
    stark = {"Authorization": f"Bearer {console.keys['stark']}"}
    path = "/dashboard/batches/batch_stark_ops"
    for headers in (ops, stark):
        seen = client.get(path, headers=headers)
        assert seen.status_code == 200, seen.text
        assert seen.json()["request_counts"]["queued"] == 1 and "progress" in seen.json()
    assert client.get(path, headers=wayne).status_code == 404
    assert client.post(f"{path}/cancel", headers=wayne).status_code == 404
    retried = client.post(f"{path}/retry_failed", headers=ops)
    assert retried.status_code == 200 and retried.json()["retried"] == []
    cancelled = client.post(f"{path}/cancel", headers=ops)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    with session_scope(settings.database_url) as session:
        assert session.get(Job, job_id).status == "cancelled"
