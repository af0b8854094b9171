"""``/v1/batches`` against the same real servers as test_api (migrated SQLite, Valkey broker,
SeaweedFS): a batch and its videos are stored all or none, its counts follow its videos, a
cancel stops every unfinished one and closes it to new videos."""

# test_api's module fixtures are imported by name for pytest to inject; the test functions'
# parameters of the same names are those fixtures, not redefinitions.

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from fvb_core.api_keys import create_api_key
from fvb_core.db import transitions
from fvb_core.db.models import Batch, Job
from fvb_core.db.session import session_scope
from scheduler.api.app import create_app

from .api_fixtures import T2V, T2V_POOL, assert_error, data_url, png_bytes, queued_job_ids, submit

I2V = "tiny-i2v"


def video(**fields) -> dict:
    return {"model": T2V, "prompt": "a red panda eating bamboo", **fields}


def stored(settings) -> tuple[int, int]:
    with session_scope(settings.database_url) as session:
        return (
            session.execute(select(func.count()).select_from(Batch)).scalar_one(),
            session.execute(select(func.count()).select_from(Job)).scalar_one(),
        )


def test_batch_with_videos_stores_each_for_the_scheduler(client, acme, broker, settings):
    body = {
        "metadata": {"dataset": "pandas-v1"},
        "requests": [video(seed=1), video(seed=2, size="32x32"), video(seed=3)],
    }
    response = client.post("/v1/batches", json=body, headers=acme)
    assert response.status_code == 200, response.text
    batch = response.json()
    assert batch["object"] == "batch" and batch["id"].startswith("batch_")
    assert batch["status"] == "in_progress"
    assert batch["metadata"] == {"dataset": "pandas-v1"}
    assert batch["request_counts"] == {
        "total": 3,
        "queued": 3,
        "in_progress": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
    }
    listed = client.get(f"/v1/videos?batch_id={batch['id']}&order=asc", headers=acme).json()
    assert [v["seed"] for v in listed["data"]] == [1, 2, 3]
    assert {v["batch_id"] for v in listed["data"]} == {batch["id"]}
    assert listed["data"][1]["size"] == "32x32"
    # Stored only: the scheduler releases them (a batch never waits on the broker).
    waiting = set(queued_job_ids(broker, f"gpu.{T2V_POOL}"))
    assert not {v["id"] for v in listed["data"]} & waiting


def test_one_bad_request_rejects_the_whole_batch_naming_it(client, acme, settings):
    before = stored(settings)
    body = {"requests": [video(), video(size="33x32"), video()]}
    response = client.post("/v1/batches", json=body, headers=acme)
    assert_error(response, 400, "requests[1].size", "requests[1]:")
    response = client.post("/v1/batches", json={"requests": [video(), "a cat"]}, headers=acme)
    assert_error(response, 400, "requests[1]", "must be an object")
    body = {"requests": [video(batch_id="batch_x")]}
    response = client.post("/v1/batches", json=body, headers=acme)
    assert_error(response, 400, "requests[0].batch_id", "set by the batch")
    response = client.post("/v1/batches", json={"requests": [video(model="nope")]}, headers=acme)
    assert response.status_code == 404 and "requests[0]" in response.json()["error"]["param"]
    assert stored(settings) == before


def test_malformed_batch_bodies_name_the_field(client, acme, settings):
    before = stored(settings)
    cases = [
        ({"requests": "a cat"}, "requests", "list of at most 1000"),
        ({"requests": [video()] * 1001}, "requests", "at most 1000"),
        ({"metadata": {"k": 1}}, "metadata", "strings"),
        ({"prompts": []}, "prompts", "Unknown parameter"),
    ]
    for body, param, fragment in cases:
        assert_error(client.post("/v1/batches", json=body, headers=acme), 400, param, fragment)
    assert_error(client.post("/v1/batches", json=[1], headers=acme), 400, "body", "object")
    assert stored(settings) == before


def queued_for(settings, tenant: str) -> int:
    with session_scope(settings.database_url) as session:
        return session.execute(
            select(func.count())
            .select_from(Job)
            .where(Job.status == "queued", Job.tenant == tenant)
        ).scalar_one()


def test_batch_that_does_not_fit_the_queue_is_refused_whole(client, acme, settings):
    queued = queued_for(settings, "acme")
    tight = TestClient(create_app(settings.model_copy(update={"max_queued_jobs": queued + 1})))
    before = stored(settings)
    response = tight.post("/v1/batches", json={"requests": [video(), video()]}, headers=acme)
    error = assert_error(response, 429, None, "no room for 2 more", "retry in")
    assert error["code"] == "queue_full" and int(response.headers["Retry-After"]) > 0
    assert stored(settings) == before


def test_empty_batch_takes_videos_through_v1_videos_and_counts_them(client, acme, settings):
    batch = client.post("/v1/batches", headers=acme).json()
    assert batch["status"] == "in_progress" and batch["request_counts"]["total"] == 0
    image = data_url(png_bytes())
    created = submit(client, acme, batch_id=batch["id"])
    assert created.status_code == 200, created.text
    i2v = client.post(
        "/v1/videos",
        json={"model": I2V, "prompt": "x", "input_reference": image, "batch_id": batch["id"]},
        headers=acme,
    )
    assert i2v.status_code == 200, i2v.text
    counts = client.get(f"/v1/batches/{batch['id']}", headers=acme).json()["request_counts"]
    assert counts["total"] == 2 and counts["queued"] == 2

    # Finish both: one succeeds, one fails -> the batch is completed.
    with session_scope(settings.database_url) as session:
        for job_id in (created.json()["id"], i2v.json()["id"]):
            transitions.claim(session, job_id, "test-worker")
        session.execute(
            update(Job).where(Job.id == created.json()["id"]).values(status="succeeded")
        )
        session.execute(update(Job).where(Job.id == i2v.json()["id"]).values(status="failed"))
    done = client.get(f"/v1/batches/{batch['id']}", headers=acme).json()
    assert done["status"] == "completed"
    assert (done["request_counts"]["completed"], done["request_counts"]["failed"]) == (1, 1)


def test_cancel_stops_every_unfinished_video_and_closes_the_batch(client, acme, settings):
    batch = client.post(
        "/v1/batches", json={"requests": [video(), video(), video()]}, headers=acme
    ).json()
    ids = [
        v["id"]
        for v in client.get(f"/v1/videos?batch_id={batch['id']}", headers=acme).json()["data"]
    ]
    with session_scope(settings.database_url) as session:
        running = transitions.claim(session, ids[0], "test-worker")
    assert running is not None
    cancelled = client.post(f"/v1/batches/{batch['id']}/cancel", headers=acme).json()
    # Queued videos stop now; the running one is flagged and stops at its next step.
    assert cancelled["status"] == "cancelling"
    assert cancelled["request_counts"]["cancelled"] == 2
    assert cancelled["request_counts"]["in_progress"] == 1
    with session_scope(settings.database_url) as session:
        assert session.get(Job, ids[0]).cancel_requested
        transitions.finish_cancelled(session, ids[0], running.attempt)
    final = client.get(f"/v1/batches/{batch['id']}", headers=acme).json()
    assert final["status"] == "cancelled" and final["request_counts"]["cancelled"] == 3
    refused = submit(client, acme, batch_id=batch["id"])
    assert_error(refused, 409, "batch_id", "was cancelled")


def test_other_tenants_batches_are_not_found(client, acme, globex):
    batch = client.post("/v1/batches", headers=acme).json()
    assert_error(client.get(f"/v1/batches/{batch['id']}", headers=globex), 404, "batch_id")
    response = client.post(f"/v1/batches/{batch['id']}/cancel", headers=globex)
    assert_error(response, 404, "batch_id")
    assert_error(submit(client, globex, batch_id=batch["id"]), 404, "batch_id")
    assert client.post("/v1/batches").status_code == 401


def test_batch_videos_yield_to_interactive_ones_unless_they_ask(client, acme, broker):
    batch = client.post(
        "/v1/batches", json={"requests": [video(), video(priority=3)]}, headers=acme
    ).json()
    listed = client.get(f"/v1/videos?batch_id={batch['id']}&order=asc", headers=acme).json()
    assert [v["priority"] for v in listed["data"]] == [-5, 3]
    joined = submit(client, acme, batch_id=batch["id"]).json()
    interactive = submit(client, acme).json()
    assert (joined["priority"], interactive["priority"]) == (-5, 0)


def test_batches_are_listed_newest_first_per_tenant_with_a_cursor(client, settings):
    with session_scope(settings.database_url) as session:
        headers = {"Authorization": f"Bearer {create_api_key(session, 'lister')}"}
    made = [client.post("/v1/batches", headers=headers).json()["id"] for _ in range(3)]
    first = client.get("/v1/batches?limit=2", headers=headers).json()
    assert first["object"] == "list" and first["has_more"] is True
    assert [b["id"] for b in first["data"]] == made[::-1][:2]
    rest = client.get(f"/v1/batches?limit=2&after={first['last_id']}", headers=headers).json()
    assert [b["id"] for b in rest["data"]] == made[:1] and rest["has_more"] is False
    assert_error(client.get("/v1/batches?limit=0", headers=headers), 400, "limit", "between 1")
    assert_error(client.get("/v1/batches?after=batch_nope", headers=headers), 400, "after")


def test_videos_added_to_a_batch_in_chunks_resume_by_item_key_and_report_bad_items(
    client, acme, settings
):
    batch = client.post("/v1/batches", headers=acme).json()["id"]
    items = [{**video(seed=i), "item_key": f"{batch}:{i}"} for i in range(5)]
    items[3] = {**video(size="33x32"), "item_key": f"{batch}:3"}
    url = f"/v1/batches/{batch}/videos"
    first = client.post(url, json={"requests": items}, headers=acme)
    assert first.status_code == 200, first.text
    answer = first.json()
    assert [(i["index"], i["created"]) for i in answer["data"]] == [
        (0, True), (1, True), (2, True), (4, True)
    ]  # fmt: skip
    (bad,) = answer["errors"]
    assert bad["index"] == 3 and bad["error"]["param"] == "requests[3].size"
    # Sent again (a resumed run): the same videos, nothing new; the fixed line goes in.
    items[3] = {**video(seed=3), "item_key": f"{batch}:3"}
    again = client.post(url, json={"requests": items}, headers=acme).json()
    assert [(i["index"], i["created"]) for i in again["data"]] == [
        (0, False), (1, False), (2, False), (3, True), (4, False)
    ]  # fmt: skip
    assert {i["id"] for i in again["data"]} >= {i["id"] for i in answer["data"]}
    counts = client.get(f"/v1/batches/{batch}", headers=acme).json()["request_counts"]
    assert counts["total"] == 5
    # The same key with another body is that item's error, not a duplicate.
    changed = client.post(
        url, json={"requests": [{**video(seed=99), "item_key": f"{batch}:0"}]}, headers=acme
    ).json()
    assert changed["data"] == [] and changed["errors"][0]["error"]["code"] == (
        "idempotency_key_reused"
    )
    assert_error(
        client.post("/v1/batches/batch_nope/videos", json={"requests": [video()]}, headers=acme),
        404,
        "batch_id",
        "batch_nope",
    )
    client.post(f"/v1/batches/{batch}/cancel", headers=acme)
    closed = client.post(url, json={"requests": [video()]}, headers=acme)
    assert_error(closed, 409, "batch_id", "cancelled")


def test_a_chunk_that_does_not_fit_the_tenants_queue_is_refused_whole(client, acme, settings):
    batch = client.post("/v1/batches", headers=acme).json()["id"]
    queued = queued_for(settings, "acme")
    tight = TestClient(create_app(settings.model_copy(update={"max_queued_jobs": queued + 2})))
    before = stored(settings)
    response = tight.post(
        f"/v1/batches/{batch}/videos", json={"requests": [video()] * 3}, headers=acme
    )
    assert_error(response, 429, None, "no room for 3 more")
    assert stored(settings) == before
