"""``/metrics`` as Prometheus reads it: parsed with prometheus-client's own text parser, its
job series and histogram counts equal to what the database says after a run of jobs,
whether the scheduler folded the trail or not; workers' GPU figures come through their beat;
the console's fleet lists idle workers too."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update

from fvb_core.api_keys import create_api_key
from fvb_core.db import fleet, rollup, transitions
from fvb_core.db.models import Job, utcnow
from fvb_core.db.session import session_scope
from scheduler.api import fleet_view
from worker import telemetry

from .api_fixtures import T2V

pytestmark = pytest.mark.timeout(120)

GPU = {
    "index": 0,
    "name": "NVIDIA H200",
    "memory_used_mib": 1024,
    "memory_total_mib": 143771,
    "utilization_pct": 87,
    "temperature_c": 61,
}


@pytest.fixture(scope="module")
def ops(settings) -> dict[str, str]:
    with session_scope(settings.database_url) as session:
        return {"Authorization": f"Bearer {create_api_key(session, 'ops', operator=True)}"}


def scrape(client, ops) -> dict:
    response = client.get("/metrics", headers=ops)
    assert response.status_code == 200, response.text
    samples: dict = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def run_jobs(settings, model: str) -> list[str]:
    """Three successes, a failure and a cancel, through the transitions."""
    with session_scope(settings.database_url) as session:
        ids = [
            transitions.create_job(session, Job(tenant="acme", model=model, params={})).id
            for _ in range(5)
        ]
        session.commit()
        for job_id in ids[:3]:
            attempt = transitions.claim(session, job_id, "host:1:cpu").attempt
            sha = hashlib.sha256(job_id.encode()).hexdigest()
            assert transitions.succeed(session, job_id, attempt, f"videos/{job_id}.mp4", 500, sha)
        attempt = transitions.claim(session, ids[3], "host:1:cpu").attempt
        assert transitions.fail(session, ids[3], attempt, "out_of_memory", "CUDA OOM")
        assert transitions.request_cancel(session, ids[4]) == "cancelled"
    return ids


@pytest.mark.parametrize("fold", [False, True], ids=["pending", "folded"])
def test_job_series_and_histograms_match_the_database(client, ops, settings, fold):
    model = f"{T2V}-metrics-{int(fold)}"  # a model of its own: the module's DB is shared
    run_jobs(settings, model)
    if fold:
        with session_scope(settings.database_url) as session:
            while rollup.fold(session):
                pass
    samples = scrape(client, ops)
    with session_scope(settings.database_url) as session:
        truth = dict(
            session.execute(
                select(Job.status, func.count())
                .where(Job.deleted_at.is_(None))
                .group_by(Job.status)
            ).all()
        )
        succeeded = session.execute(
            select(Job.created_at, Job.started_at, Job.finished_at).where(
                Job.model == model, Job.status == "succeeded"
            )
        ).all()
    for status in ("queued", "running", "succeeded", "failed", "cancelled"):
        assert samples[("fvb_jobs", (("status", status),))] == truth.get(status, 0), status
    by_model = {
        dict(labels)["state"]: value
        for (name, labels), value in samples.items()
        if name == "fvb_jobs_by_model" and dict(labels)["model"] == model
    }
    assert by_model == {"completed": 3, "failed": 1, "cancelled": 1}
    assert samples[("fvb_jobs_completed_total", (("model", model),))] == 3
    assert (
        samples[("fvb_jobs_failed_total", (("error_code", "out_of_memory"), ("model", model)))] == 1
    )
    assert samples[("fvb_jobs_cancelled_total", (("model", model),))] == 1
    assert samples[("fvb_upload_bytes_total", (("model", model),))] == 1500
    render = sum((f - s).total_seconds() for _, s, f in succeeded)
    assert samples[("fvb_job_render_seconds_count", (("model", model),))] == 3
    assert samples[("fvb_job_render_seconds_sum", (("model", model),))] == pytest.approx(render)
    assert samples[("fvb_job_render_seconds_bucket", (("le", "+Inf"), ("model", model)))] == 3
    assert samples[("fvb_job_queue_wait_seconds_count", (("model", model),))] == 3
    assert samples[("fvb_rollup_pending_events", ())] >= 0
    assert ("fvb_webhook_deliveries_total", (("outcome", "delivered"),)) in samples


def test_workers_report_their_gpus_through_the_beat_and_idle_ones_are_listed(client, ops, settings):
    with session_scope(settings.database_url) as session:
        fleet.register_worker(session, "fvb-m-0-11@gpu-box", "metrics-pool", 1, "gpu-box", 11)
        assert fleet.beat_worker(
            session, "fvb-m-0-11@gpu-box", {"gpus": [GPU], "job_workers": ["gpu-box:12:0"]}
        )
        job = transitions.create_job(session, Job(tenant="acme", model=T2V, params={}))
        earlier = transitions.create_job(session, Job(tenant="acme", model=T2V, params={}))
        session.commit()
        attempt = transitions.claim(session, earlier.id, "gpu-box:12:0").attempt
        assert transitions.succeed(session, earlier.id, attempt, "videos/x.mp4", 1, "0" * 64)
        # It rendered for two minutes, five minutes ago.
        session.execute(
            update(Job)
            .where(Job.id == earlier.id)
            .values(
                started_at=utcnow() - timedelta(minutes=7),
                finished_at=utcnow() - timedelta(minutes=5),
            )
        )
        transitions.claim(session, job.id, "gpu-box:12:0")
        fleet.register_worker(session, "fvb-m-1-21@gpu-box", "metrics-pool", 1, "gpu-box", 21)
        fleet.record_models(session, "gpu-box:12:0", ["wan-1.3b", "wan-14b"])
    samples = scrape(client, ops)
    labels = (("gpu", "0"), ("name", "NVIDIA H200"), ("worker", "fvb-m-0-11@gpu-box"))
    assert samples[("fvb_gpu_memory_used_bytes", labels)] == 1024 * 2**20
    assert samples[("fvb_gpu_memory_total_bytes", labels)] == 143771 * 2**20
    assert samples[("fvb_gpu_utilization_ratio", labels)] == 0.87
    assert samples[("fvb_gpu_temperature_celsius", labels)] == 61
    up = (("host", "gpu-box"), ("pool", "metrics-pool"), ("worker", "fvb-m-1-21@gpu-box"))
    assert samples[("fvb_worker_up", up)] == 1  # idle, and listed
    with session_scope(settings.database_url) as session:
        shown = {w.worker_id: w for w in fleet_view.fleet(session, settings, None)}
        for_acme = fleet_view.fleet(session, settings, "acme")
        for_globex = fleet_view.fleet(session, settings, "globex")
        later = fleet_view.fleet(session, settings, None, utcnow() + timedelta(minutes=2))
    busy = shown["fvb-m-0-11@gpu-box"]
    assert busy.current_job is not None and busy.current_job.id == job.id
    assert busy.gpus[0].name == "NVIDIA H200" and not busy.stale
    assert busy.loaded_models == ["wan-1.3b", "wan-14b"]
    assert busy.jobs_done == 1 and 0.2 <= busy.busy_fraction_10m < 0.25  # 120 s + the running
    assert shown["fvb-m-1-21@gpu-box"].jobs_done == 0
    assert shown["fvb-m-1-21@gpu-box"].busy_fraction_10m == 0
    assert shown["fvb-m-1-21@gpu-box"].current_job is None
    assert [w.worker_id for w in for_acme if w.pool == "metrics-pool"] == ["fvb-m-0-11@gpu-box"]
    assert not [w for w in for_globex if w.pool == "metrics-pool"]
    assert all(w.stale for w in later if w.pool == "metrics-pool")


def test_telemetry_reads_nvml_when_there_is_one(monkeypatch):
    class Memory:
        used, total = 3 * 2**20, 80 * 2**30

    class Rates:
        gpu = 42

    class FakeNvml:
        NVML_TEMPERATURE_GPU = 0

        class NVMLError(Exception):
            pass

        nvmlInit = nvmlShutdown = staticmethod(lambda: None)
        nvmlDeviceGetCount = staticmethod(lambda: 2)
        nvmlDeviceGetHandleByIndex = staticmethod(lambda i: i)
        nvmlDeviceGetName = staticmethod(lambda h: f"GPU {h}")
        nvmlDeviceGetMemoryInfo = staticmethod(lambda h: Memory)
        nvmlDeviceGetUtilizationRates = staticmethod(lambda h: Rates)
        nvmlDeviceGetTemperature = staticmethod(lambda h, kind: 50 + h)

    monkeypatch.setitem(__import__("sys").modules, "pynvml", FakeNvml)
    (gpu,) = telemetry.gpu_stats(telemetry.gpu_indices("1"))
    assert gpu == {
        "index": 1,
        "name": "GPU 1",
        "memory_used_mib": 3,
        "memory_total_mib": 80 * 1024,
        "utilization_pct": 42,
        "temperature_c": 51,
    }
    assert len(telemetry.gpu_stats(None)) == 2
    assert telemetry.collect(None, "cpu")["gpus"] == []


def test_a_job_process_records_the_models_it_holds(in_process):
    runner = in_process.runner()
    in_process.run_all(runner, [in_process.submit(prompt="a kite over the dunes")])
    with session_scope(in_process.settings.database_url) as session:
        assert fleet.loaded_models(session, [runner.worker_id]) == {runner.worker_id: ["tiny"]}
