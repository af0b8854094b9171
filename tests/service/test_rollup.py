"""The roll-ups (``fvb_core/db/rollup.py``) agree with the jobs table at every moment: with
nothing folded, half folded, all folded, on SQLite and PostgreSQL; the readers use the
pending-events index, not a scan; the migration folds history written before it."""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, func, select, text

from fvb_core.db import rollup, transitions
from fvb_core.db.migrate import upgrade
from fvb_core.db.models import Job, JobEvent, utcnow
from fvb_core.db.session import session_scope
from fvb_tools.localstack.postgres import create_database

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'fvb.db'}"
    else:
        server = request.getfixturevalue("postgres_server")
        url = create_database(server.url, f"r_{uuid.uuid4().hex[:12]}")
    upgrade(url)
    return url


def truth(url: str) -> Counter:
    with session_scope(url) as session:
        rows = session.execute(
            select(Job.tenant, Job.model, Job.status, func.count())
            .where(Job.deleted_at.is_(None))
            .group_by(Job.tenant, Job.model, Job.status)
        ).all()
    return Counter({(t, m, s): n for t, m, s, n in rows})


def counts(url: str, tenant: str | None = None) -> Counter:
    with session_scope(url) as session:
        rollup.snapshot(session)
        return rollup.job_counts(session, tenant)


def history(url: str) -> dict[str, list[str]]:
    """Jobs of two tenants and two models through every kind of transition."""
    ids: dict[str, list[str]] = {}
    with session_scope(url) as session:

        def new(tenant: str, model: str) -> str:
            job = Job(tenant=tenant, model=model, params={"prompt": "p"})
            return transitions.create_job(session, job).id

        ok = [new("acme", "m1") for _ in range(3)] + [new("globex", "m2")]
        failed = [new("acme", "m1"), new("acme", "m2")]
        cancelled, queued, deleted = new("acme", "m1"), new("globex", "m1"), new("acme", "m2")
        retried, requeued, running = new("acme", "m1"), new("acme", "m2"), new("globex", "m2")
        session.commit()
        for job_id in ok:
            attempt = transitions.claim(session, job_id, "w").attempt
            key = f"videos/{job_id}/attempt-{attempt}.mp4"
            sha = hashlib.sha256().hexdigest()
            assert transitions.succeed(session, job_id, attempt, key, 1000, sha)
        for job_id, code in zip(failed, ("out_of_memory", "invalid_params"), strict=True):
            assert transitions.fail(session, job_id, transitions.claim(session, job_id, "w")
                                    .attempt, code, "x")  # fmt: skip
        assert transitions.request_cancel(session, cancelled) == "cancelled"
        transitions.claim(session, deleted, "w")
        transitions.fail(session, deleted, 1, "out_of_memory", "x")
        assert transitions.hide(session, deleted, "acme")
        transitions.fail(session, retried, transitions.claim(session, retried, "w").attempt,
                         "out_of_memory", "x")  # fmt: skip
        assert transitions.retry_job(session, retried, "acme", 2)
        attempt = transitions.claim(session, requeued, "w").attempt
        assert transitions.retry_later(session, requeued, attempt, "storage_unavailable", "x")
        transitions.claim(session, running, "w")
    ids.update(ok=ok, failed=failed, queued=[queued], running=[running])
    return ids


def test_counts_are_exact_before_during_and_after_folding(url):
    history(url)
    expected = truth(url)
    assert counts(url) == expected  # nothing folded: all from the pending events
    assert counts(url, "globex") == Counter({k: n for k, n in expected.items() if k[0] == "globex"})
    with session_scope(url) as session:
        assert rollup.fold(session, limit=7) == 7  # part of the trail
    assert counts(url) == expected
    with session_scope(url) as session:
        while rollup.fold(session, limit=5):
            pass
        assert rollup.pending_count(session) == 0
    assert counts(url) == expected
    # More history after a fold: still exact.
    with session_scope(url) as session:
        job_id = transitions.create_job(session, Job(tenant="acme", model="m1", params={})).id
        transitions.claim(session, job_id, "w")
    assert counts(url) == truth(url) != expected


def test_outcomes_and_latency_histograms(url):
    ids = history(url)
    with session_scope(url) as session:
        rollup.fold(session, limit=9)
    with session_scope(url) as session:
        rollup.snapshot(session)
        d = rollup.pending(session)
        out = rollup.outcomes(session, d)
        hist = rollup.latency(session, d)
    n = out["n"]
    assert n[("acme", "m1", "completed", "")] == 3 and n[("globex", "m2", "completed", "")] == 1
    assert out["output_bytes"][("acme", "m1", "completed", "")] == 3000
    assert n[("acme", "m1", "failed", "out_of_memory")] == 2  # one of them retried since
    assert n[("acme", "m2", "failed", "invalid_params")] == 1
    assert n[("acme", "m2", "failed", "out_of_memory")] == 1  # the deleted one
    assert n[("acme", "m1", "cancelled", "")] == 1 and n[("acme", "m1", "retried", "")] == 1
    assert n[("acme", "m2", "requeued", "")] == 1 and n[("acme", "m2", "deleted", "")] == 1
    assert hist[("m1", "render")][1] == 3 and sum(hist[("m1", "render")][0]) == 3
    assert hist[("m2", "queue_wait")][1] == 1 and len(ids["ok"]) == 4


def test_queue_samples_per_pool(url):
    history(url)
    minute = utcnow().replace(second=0, microsecond=0)
    with session_scope(url) as session:
        rollup.sample_queues(session, {"m1": "small", "m2": "big"}, minute)
        rollup.sample_queues(session, {"m1": "small", "m2": "big"}, minute)  # idempotent
    with session_scope(url) as session:
        samples = rollup.queue_samples(session, minute - timedelta(minutes=1))
        got = {(s.pool, s.queued, s.running) for s in samples}
    # queued: globex/m1 + retried (acme/m1) and requeued (acme/m2); running: globex/m2
    assert got == {("small", 2, 0), ("big", 1, 1)}


def test_the_pending_read_uses_its_partial_index(tmp_path):
    url = f"sqlite:///{tmp_path / 'fvb.db'}"
    upgrade(url)
    engine = create_engine(url)
    with engine.connect() as conn:
        plan = conn.execute(
            text(
                "EXPLAIN QUERY PLAN SELECT job_events.id FROM job_events "
                "WHERE NOT job_events.rolled_up ORDER BY job_events.id LIMIT 10"
            )
        ).all()
    assert "ix_job_events_pending" in " ".join(str(row) for row in plan), plan


def test_events_written_before_the_migration_fold_too(url):
    history(url)
    with session_scope(url) as session:  # as if written by a release without roll-ups
        session.execute(JobEvent.__table__.update().values(rolled_up=False))
        session.execute(text("DELETE FROM job_counts"))
    with session_scope(url) as session:
        while rollup.fold(session):
            pass
    assert counts(url) == truth(url)


def test_minutes_count_what_finished_in_each_minute(url):
    history(url)
    since = utcnow() - timedelta(minutes=5)
    with session_scope(url) as session:
        rollup.snapshot(session)
        before = rollup.minutes(session, since, None, rollup.pending(session))
    with session_scope(url) as session:
        while rollup.fold(session, limit=4):
            pass
    with session_scope(url) as session:
        rollup.snapshot(session)
        after = rollup.minutes(session, since, None, rollup.pending(session))
        acme = rollup.minutes(session, since, "acme", rollup.pending(session))

    def total(found, name):
        return sum(getattr(m, name) for m in found.values())

    # 4 completed; failed: 2 + the deleted one + the retried one's first attempt.
    assert (total(before, "completed"), total(before, "failed")) == (4, 4)
    assert (total(after, "completed"), total(after, "failed")) == (4, 4)
    assert (total(acme, "completed"), total(acme, "failed")) == (3, 4)
    assert sum(sum(m.render) for m in after.values()) == 4


def test_percentiles_from_buckets_interpolate_like_prometheus():
    buckets = [0] * len(rollup.LATENCY_BUCKETS)
    assert rollup.percentile_of(buckets, 0.5) is None
    for seconds in (12, 15, 18, 25):  # buckets (10, 20] x3 and (20, 30] x1
        buckets[rollup.bucket_of(seconds)] += 1
    assert rollup.percentile_of(buckets, 0.5) == pytest.approx(10 + 10 * 2 / 3)
    assert rollup.percentile_of(buckets, 1.0) == pytest.approx(30)
    buckets[-1] += 10  # beyond the last bound: its lower bound is the answer
    assert rollup.percentile_of(buckets, 0.99) == rollup.LATENCY_BUCKETS[-2]


def test_the_scheduler_pass_folds_everything_and_samples_the_queues(url):
    from fvb_core.settings import Settings
    from scheduler.rollups import run_pass

    history(url)
    folded, minute = run_pass(Settings(database_url=url), {"m1": "small", "m2": "big"})
    assert folded > 0 and minute is not None
    with session_scope(url) as session:
        assert rollup.pending_count(session) == 0
        assert {s.pool for s in rollup.queue_samples(session, minute)} == {"small", "big"}
    assert counts(url) == truth(url)
    assert run_pass(Settings(database_url=url), {}, minute)[0] == 0  # nothing left


def test_the_fleet_sums_its_workers_busy_time_in_the_database(url):
    from sqlalchemy import update

    from fvb_core.db import fleet
    from fvb_core.settings import Settings
    from scheduler.api import fleet_view

    now = utcnow()
    with session_scope(url) as session:
        fleet.register_worker(session, "fvb-p-0-1@box", "p", 1, "box", 1)
        fleet.beat_worker(session, "fvb-p-0-1@box", {"gpus": [], "job_workers": ["box:2:0"]})
        job_id = transitions.create_job(session, Job(tenant="acme", model="m1", params={})).id
        transitions.claim(session, job_id, "box:2:0")
        transitions.succeed(session, job_id, 1, "videos/x.mp4", 1, "0" * 64)
        session.execute(
            update(Job)  # rendered 11 to 8 minutes ago: 2 of those minutes in the window
            .where(Job.id == job_id)
            .values(started_at=now - timedelta(minutes=11), finished_at=now - timedelta(minutes=8))
        )
    with session_scope(url) as session:
        (worker,) = fleet_view.fleet(session, Settings(database_url=url), None, now)
    assert worker.jobs_done == 1 and worker.busy_fraction_10m == pytest.approx(0.2, abs=0.01)
