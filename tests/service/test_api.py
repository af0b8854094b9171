"""The HTTP API against real servers: a migrated SQLite file, Valkey as the Celery broker,
SeaweedFS as the S3 store, tiny Wan model folders; the official ``openai`` SDK against a real
uvicorn server for the round trip."""

from __future__ import annotations

import hashlib
import io
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select, update

from fvb_core.api_keys import create_api_key
from fvb_core.db import transitions
from fvb_core.db.models import ApiKey, Batch, Job, utcnow
from fvb_core.db.session import session_scope
from fvb_core.storage import video_key
from fvb_tools.localstack.ports import free_port
from scheduler.api.app import ConfigurationError, create_app

from .api_fixtures import (
    I2V,
    I2V_POOL,
    T2V,
    T2V_POOL,
    assert_error,
    data_url,
    events,
    load_job,
    png_bytes,
    queued_job_ids,
    run_to_success,
    submit,
)

T2V_PARAMS = {
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "num_frames",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "fps",
    "seconds",
    "metadata",
}


# --- create ------------------------------------------------------------------------------


def test_multipart_create_stores_validated_params_and_leaves_the_job_to_the_scheduler(
    client, acme, settings, broker
):
    response = submit(
        client,
        acme,
        size="64x32",
        num_frames="17",
        num_inference_steps="8",
        guidance_scale="6.5",
        seed="1234",
        fps="8",
        negative_prompt="blurry",
        metadata={"shot": "12", "take": "b"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["openai-poll-after-ms"] == "200"
    video = response.json()
    assert video["object"] == "video"
    assert video["status"] == "queued"
    assert video["model"] == T2V
    assert video["size"] == "64x32"
    assert video["seconds"] == "2"  # 17 frames at 8 fps: a first frame and 2 s of motion
    assert video["progress"] == 0
    assert video["error"] is None and video["completed_at"] is None
    assert abs(video["created_at"] - time.time()) < 30
    assert video["metadata"] == {"shot": "12", "take": "b"}

    job = load_job(settings, video["id"])
    assert job.tenant == "acme" and job.status == "queued" and job.priority == 0
    assert job.params == {
        "prompt": "a red panda eating bamboo",
        "negative_prompt": "blurry",
        "width": 64,
        "height": 32,
        "num_frames": 17,
        "num_inference_steps": 8,
        "guidance_scale": 6.5,
        "seed": 1234,
        "fps": 8,
        "seconds": "2",
        "metadata": {"shot": "12", "take": "b"},
    }
    assert len(job.request_hash) == 64
    # The API only stores the job: the scheduler releases it to the pool's queue.
    assert (job.pool, job.dispatched_at) == (T2V_POOL, None) and job.work > 0
    assert video["id"] not in queued_job_ids(broker, f"gpu.{T2V_POOL}")
    assert events(settings, video["id"]) == [(None, "queued")]


def test_json_create_accepts_numbers_and_rounds_seconds_to_temporal_factor(client, acme, settings):
    # 2 s at 8 fps is 16 frames; the model needs 4*k+1, the nearest is 17.
    response = submit(client, acme, "json", seconds=2, fps=8, priority=3)
    assert response.status_code == 200, response.text
    video = response.json()
    assert video["num_frames"] == 17
    assert video["seconds"] == "2"
    assert video["priority"] == 3
    job = load_job(settings, video["id"])
    assert set(job.params) == T2V_PARAMS
    assert job.params["num_frames"] == 17 and job.priority == 3


def test_defaults_come_from_the_model_and_a_seed_is_picked_once(client, acme, settings):
    response = submit(client, acme, "json")
    assert response.status_code == 200, response.text
    video = response.json()
    # Default 4 s at the model's 8 fps = 32 frames, rounded to 33 (= max_frames).
    assert video["size"] == "64x64"
    assert video["num_frames"] == 33
    assert video["seconds"] == "4"
    params = load_job(settings, video["id"]).params
    assert params["num_inference_steps"] == 20  # min(50, max_steps)
    assert params["guidance_scale"] == 5.0
    assert params["negative_prompt"] is None
    assert isinstance(params["seed"], int) and 0 <= params["seed"] < 2**32
    assert client.get(f"/v1/videos/{video['id']}", headers=acme).json()["seed"] == params["seed"]


VALIDATION_CASES = [
    # (fields, status, param, message fragments)
    ({"model": "sora-2"}, 404, "model", ["'sora-2' does not exist", T2V]),
    ({"size": "64by64"}, 400, "size", ["WIDTHxHEIGHT"]),
    ({"size": "72x64"}, 400, "size", ["multiples of 16"]),
    ({"size": "512x512"}, 400, "size", ["262144 pixels", "at most 65536"]),
    ({"num_frames": 10}, 400, "num_frames", ["4*k+1", "9 or 13"]),
    ({"num_frames": 37}, 400, "num_frames", ["above the maximum of 33"]),
    ({"num_frames": "many"}, 400, "num_frames", ["must be an integer"]),
    ({"seconds": 10}, 400, "seconds", ["81 frames", "at most 33 frames"]),
    ({"seconds": -1}, 400, "seconds", ["must be positive"]),
    ({"num_inference_steps": 0}, 400, "num_inference_steps", ["between 1 and 20"]),
    ({"num_inference_steps": 21}, 400, "num_inference_steps", ["between 1 and 20"]),
    ({"guidance_scale": -0.5}, 400, "guidance_scale", ["between 0.0 and 30.0"]),
    ({"guidance_scale": 30.5}, 400, "guidance_scale", ["between 0.0 and 30.0"]),
    ({"prompt": ""}, 400, "prompt", ["must not be empty"]),
    ({"prompt": "   "}, 400, "prompt", ["must not be empty"]),
    ({"prompt": "x" * 2001}, 400, "prompt", ["2001 characters", "at most 2000"]),
    ({"priority": 11}, 400, "priority", ["between -10 and 10"]),
    ({"priority": -11}, 400, "priority", ["between -10 and 10"]),
    ({"seed": "lucky"}, 400, "seed", ["must be an integer"]),
    ({"fps": 0}, 400, "fps", ["between 1 and 120"]),
    ({"style": "noir"}, 400, "style", ["Unknown parameter: 'style'"]),
    ({"input_reference": data_url(png_bytes())}, 400, "input_reference", ["text-to-video"]),
    ({"batch_id": "batch_missing"}, 404, "batch_id", ["No batch found"]),
]


@pytest.mark.parametrize("encoding", ["multipart", "json"])
@pytest.mark.parametrize(
    ("fields", "status", "param", "fragments"),
    VALIDATION_CASES,
    ids=[f"{next(iter(case[0]))}-{i}" for i, case in enumerate(VALIDATION_CASES)],
)
def test_invalid_create_is_rejected_naming_the_field(
    client, acme, settings, encoding, fields, status, param, fragments
):
    with session_scope(settings.database_url) as session:
        before = session.execute(select(Job.id)).scalars().all()
    response = submit(client, acme, encoding, **fields)
    error = assert_error(response, status, param, *fragments)
    assert error["type"] == "invalid_request_error"
    with session_scope(settings.database_url) as session:
        assert session.execute(select(Job.id)).scalars().all() == before


def test_missing_prompt_bad_metadata_and_unreadable_bodies_are_rejected(client, acme):
    response = client.post("/v1/videos", json={"model": T2V}, headers=acme)
    assert_error(response, 400, "prompt", "prompt is required")
    response = submit(client, acme, "json", metadata={"take": 2})
    assert_error(response, 400, "metadata", "metadata[take] must be a string")
    response = client.post("/v1/videos", content=b"prompt=x", headers=acme)
    assert_error(response, 415, None, "multipart/form-data or application/json")
    response = client.post(
        "/v1/videos", content=b"{not json", headers={**acme, "Content-Type": "application/json"}
    )
    assert_error(response, 400, None, "not valid JSON")
    response = client.post(
        "/v1/videos",
        content=b"{}",
        headers={**acme, "Content-Type": "application/json", "Content-Length": "99999999"},
    )
    assert_error(response, 413, None, "at most 16777216")


def test_image_to_video_stores_the_reference_as_png_before_the_job(
    client, acme, settings, s3, broker
):
    rgba = png_bytes((80, 48), mode="RGBA")
    response = submit(client, acme, model=I2V, input_reference=("ref.png", rgba, "image/png"))
    assert response.status_code == 200, response.text
    job_id = response.json()["id"]
    job = load_job(settings, job_id)
    assert job.params["input_image_key"] == f"inputs/{job_id}/image.png"
    assert set(job.params) == T2V_PARAMS | {"input_image_key"}
    stored = s3.get_object(Bucket=settings.s3_bucket, Key=job.params["input_image_key"])
    assert stored["ContentType"] == "image/png"
    image = Image.open(io.BytesIO(stored["Body"].read()))
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (80, 48))
    assert job.pool == I2V_POOL and job_id not in queued_job_ids(broker, f"gpu.{I2V_POOL}")

    # The same image as a data URL (JPEG this time) in a JSON body.
    jpeg = png_bytes((32, 32), fmt="JPEG")
    response = submit(client, acme, "json", model=I2V, input_reference=data_url(jpeg, "image/jpeg"))
    assert response.status_code == 200, response.text
    key = load_job(settings, response.json()["id"]).params["input_image_key"]
    image = Image.open(io.BytesIO(s3.get_object(Bucket=settings.s3_bucket, Key=key)["Body"].read()))
    assert (image.format, image.size) == ("PNG", (32, 32))

    # An image reference object ({"image_url": ...}) as a form sends it: input_reference[image_url].
    response = submit(client, acme, model=I2V, input_reference={"image_url": data_url(jpeg)})
    assert response.status_code == 200, response.text
    assert load_job(settings, response.json()["id"]).params["input_image_key"]


@pytest.mark.parametrize(
    ("reference", "fragment"),
    [
        (None, "input_reference (an image) is required"),
        (("ref.png", b"not an image at all", "image/png"), "not a decodable image"),
        (("big.png", b"\0" * (10 * 1024 * 1024 + 1), "image/png"), "larger than 10 MiB"),
        ("https://example.com/cat.png", "data:image/...;base64,"),
        ("data:image/png;base64,@@@@", "not valid base64"),
    ],
    ids=["missing", "undecodable", "too-many-bytes", "remote-url", "bad-base64"],
)
def test_bad_reference_image_is_rejected(client, acme, reference, fragment):
    fields = {"model": I2V}
    if reference is not None:
        fields["input_reference"] = reference
    response = submit(client, acme, **fields)
    assert_error(response, 400, "input_reference", fragment)


def test_too_wide_image_error_names_its_size(client, acme):
    response = submit(
        client, acme, model=I2V, input_reference=("wide.png", png_bytes((4097, 8)), "image/png")
    )
    assert_error(response, 400, "input_reference", "4097x8", "at most 4096")


def test_same_idempotency_key_and_body_returns_the_same_job(client, acme, settings):
    headers = {**acme, "Idempotency-Key": "render-001"}
    first = submit(client, headers, "json", seconds=1, metadata={"a": "b"})
    assert first.status_code == 200, first.text
    # The same request as the SDK would send it (multipart, strings) is the same request.
    again = submit(client, headers, "multipart", seconds="1", metadata={"a": "b"})
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    job = load_job(settings, first.json()["id"])
    assert job.idempotency_key == "render-001"
    with session_scope(settings.database_url) as session:
        same_key = session.execute(
            select(Job.id).where(Job.idempotency_key == "render-001", Job.tenant == "acme")
        ).all()
    assert len(same_key) == 1


def test_same_idempotency_key_with_a_different_body_is_a_conflict(client, acme, globex):
    headers = {**acme, "Idempotency-Key": "render-002"}
    assert submit(client, headers, seconds=1).status_code == 200
    response = submit(client, headers, seconds=2)
    assert_error(response, 409, "Idempotency-Key", "different request body")
    # Keys are per tenant: another tenant may use the same one.
    other = submit(client, {**globex, "Idempotency-Key": "render-002"}, seconds=2)
    assert other.status_code == 200


def test_admission_returns_429_with_retry_after_when_the_tenants_queue_is_full(
    client, acme, globex, settings
):
    with session_scope(settings.database_url) as session:
        queued = len(
            session.execute(
                select(Job.id).where(Job.status == "queued", Job.tenant == "acme")
            ).all()
        )
    tight = TestClient(create_app(settings.model_copy(update={"max_queued_jobs": queued + 1})))
    assert submit(tight, acme).status_code == 200
    response = submit(tight, acme)
    error = assert_error(response, 429, None, f"'acme' has {queued + 1} queued jobs", "retry in")
    assert error["code"] == "queue_full"
    assert int(response.headers["Retry-After"]) > 0
    # The limit is the tenant's: another tenant is not blocked by it.
    assert submit(tight, globex).status_code == 200


def test_job_in_an_existing_batch_is_listed_under_it(client, acme, settings):
    with session_scope(settings.database_url) as session:
        session.add(Batch(id="batch_api_1", tenant="acme"))
    created = submit(client, acme, batch_id="batch_api_1")
    assert created.status_code == 200, created.text
    assert created.json()["batch_id"] == "batch_api_1"
    listed = client.get("/v1/videos?batch_id=batch_api_1", headers=acme).json()
    assert [v["id"] for v in listed["data"]] == [created.json()["id"]]
    # Another tenant's batch is not yours to add to.
    with session_scope(settings.database_url) as session:
        session.add(Batch(id="batch_globex_1", tenant="globex"))
    assert_error(submit(client, acme, batch_id="batch_globex_1"), 404, "batch_id")


# --- auth --------------------------------------------------------------------------------


def test_requests_without_a_valid_key_get_401(client, settings, acme):
    assert_error(client.get("/v1/videos"), 401, None, "Missing API key")
    assert_error(
        client.get("/v1/videos", headers={"Authorization": "Bearer fvb-wrong"}),
        401,
        None,
        "Incorrect API key",
    )
    assert_error(client.get("/v1/models", headers={"Authorization": "Basic abc"}), 401, None)
    assert_error(submit(client, {}), 401, None, "Missing API key")
    with session_scope(settings.database_url) as session:
        key = create_api_key(session, "acme", name="to-revoke")
    revoked = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/videos", headers=revoked).status_code == 200
    with session_scope(settings.database_url) as session:
        session.execute(update(ApiKey).where(ApiKey.prefix == key[:12]).values(revoked_at=utcnow()))
    assert_error(client.get("/v1/videos", headers=revoked), 401, None, "revoked")


def test_api_keys_are_stored_hashed(settings):
    with session_scope(settings.database_url) as session:
        key = create_api_key(session, "initech", name="ci")
    assert key.startswith("fvb-") and len(key) > 40
    with session_scope(settings.database_url) as session:
        row = session.execute(select(ApiKey).where(ApiKey.tenant == "initech")).scalar_one()
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert row.prefix == key[:12] and row.name == "ci"


def test_another_tenants_video_is_404_everywhere(client, acme, globex):
    video_id = submit(client, acme).json()["id"]
    for method, path in [
        ("GET", f"/v1/videos/{video_id}"),
        ("GET", f"/v1/videos/{video_id}/content"),
        ("POST", f"/v1/videos/{video_id}/cancel"),
        ("DELETE", f"/v1/videos/{video_id}"),
    ]:
        response = client.request(method, path, headers=globex)
        assert_error(response, 404, "video_id", f"No video found with id '{video_id}'")
    listed = client.get("/v1/videos?limit=100", headers=globex).json()["data"]
    assert video_id not in [v["id"] for v in listed]
    assert client.get(f"/v1/videos/{video_id}", headers=acme).json()["status"] == "queued"


def _no_auth_client(settings, server: str, client: str) -> TestClient:
    """The app without auth, as reached on ``server`` from ``client`` (the socket's two ends)."""
    app = create_app(settings.model_copy(update={"auth_enabled": False}))
    host = f"[{server}]" if ":" in server else server
    return TestClient(app, base_url=f"http://{host}", client=(client, 50000))


def test_without_auth_every_request_is_the_default_tenant(settings):
    local = _no_auth_client(settings, "127.0.0.1", "127.0.0.1")
    response = submit(local, {})
    assert response.status_code == 200, response.text
    assert load_job(settings, response.json()["id"]).tenant == "default"


@pytest.mark.parametrize(
    ("server", "client"),
    [("192.0.2.7", "192.0.2.9"), ("127.0.0.1", "192.0.2.9"), ("::1", "10.0.0.1")],
)
def test_without_auth_a_request_that_arrived_off_loopback_is_refused(settings, server, client):
    refused = _no_auth_client(settings, server, client)
    for method, path in [("POST", "/v1/videos"), ("GET", "/v1/videos"), ("GET", "/metrics")]:
        response = refused.request(method, path, json={"model": T2V, "prompt": "x"})
        error = assert_error(response, 403, None, "loopback", client)
        assert error["code"] == "loopback_only"


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "api.example.com"])
def test_app_refuses_to_build_without_auth_on_a_public_address(settings, host):
    with pytest.raises(ConfigurationError, match="loopback"):
        create_app(settings.model_copy(update={"auth_enabled": False, "api_host": host}))


def test_app_refuses_to_build_without_a_models_config(settings, tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigurationError, match=r"nope\.toml does not exist"):
        create_app(settings.model_copy(update={"models_config": missing}))


# --- retrieve, list, content, cancel, delete ----------------------------------------------


def test_retrieve_maps_job_states_to_openai_statuses(client, acme, settings, s3):
    def status_of(job_id):
        return client.get(f"/v1/videos/{job_id}", headers=acme).json()

    running = submit(client, acme).json()["id"]
    with session_scope(settings.database_url) as session:
        claim = transitions.claim(session, running, "w1")
        transitions.heartbeat(session, running, claim.attempt, progress=42)
    video = status_of(running)
    assert (video["status"], video["progress"], video["error"]) == ("in_progress", 42, None)

    failed = submit(client, acme).json()["id"]
    with session_scope(settings.database_url) as session:
        claim = transitions.claim(session, failed, "w1")
        transitions.fail(session, failed, claim.attempt, "out_of_memory", "CUDA OOM")
    video = status_of(failed)
    assert video["status"] == "failed"
    assert video["error"] == {"code": "out_of_memory", "message": "CUDA OOM"}
    assert video["completed_at"] is not None

    cancelled = submit(client, acme).json()["id"]
    client.post(f"/v1/videos/{cancelled}/cancel", headers=acme)
    video = status_of(cancelled)
    assert video["status"] == "failed" and video["error"]["code"] == "cancelled"

    done = submit(client, acme).json()["id"]
    content = run_to_success(settings, s3, done)
    video = status_of(done)
    assert (video["status"], video["progress"]) == ("completed", 100)
    assert video["completed_at"] >= video["created_at"]
    assert video["output"] == {
        "uri": f"s3://{settings.s3_bucket}/{video_key(done, 1)}",
        "bytes": len(content),
        "sha256": hashlib.sha256(content).hexdigest(),
    }


def test_list_is_newest_first_and_pages_with_after(client, settings):
    with session_scope(settings.database_url) as session:
        key = create_api_key(session, "lister")
    headers = {"Authorization": f"Bearer {key}"}
    ids = [submit(client, headers).json()["id"] for _ in range(5)]

    page = client.get("/v1/videos?limit=2", headers=headers).json()
    assert page["object"] == "list"
    assert [v["id"] for v in page["data"]] == [ids[4], ids[3]]
    assert (page["first_id"], page["last_id"], page["has_more"]) == (ids[4], ids[3], True)
    page = client.get(f"/v1/videos?limit=2&after={ids[3]}", headers=headers).json()
    assert [v["id"] for v in page["data"]] == [ids[2], ids[1]]
    page = client.get(f"/v1/videos?limit=2&after={ids[1]}", headers=headers).json()
    assert [v["id"] for v in page["data"]] == [ids[0]] and page["has_more"] is False

    page = client.get("/v1/videos?order=asc&limit=3", headers=headers).json()
    assert [v["id"] for v in page["data"]] == ids[:3]

    client.post(f"/v1/videos/{ids[2]}/cancel", headers=headers)
    failed = client.get("/v1/videos?status=failed", headers=headers).json()
    assert [v["id"] for v in failed["data"]] == [ids[2]]
    queued = client.get("/v1/videos?status=queued", headers=headers).json()
    assert [v["id"] for v in queued["data"]] == [ids[4], ids[3], ids[1], ids[0]]
    empty = client.get("/v1/videos?status=completed", headers=headers).json()
    assert empty == {"object": "list", "data": [], "first_id": None, "last_id": None,
                     "has_more": False}  # fmt: skip


@pytest.mark.parametrize(
    ("query", "param", "fragment"),
    [
        ("limit=0", "limit", "between 1 and 100"),
        ("limit=101", "limit", "between 1 and 100"),
        ("order=sideways", "order", "'asc' or 'desc'"),
        ("status=done", "status", "unknown status 'done'"),
        ("after=video_nope", "after", "video_nope"),
    ],
)
def test_bad_list_query_is_rejected(client, acme, query, param, fragment):
    assert_error(client.get(f"/v1/videos?{query}", headers=acme), 400, param, fragment)


def test_content_streams_the_mp4_once_completed(client, acme, settings, s3):
    video_id = submit(client, acme).json()["id"]
    error = assert_error(
        client.get(f"/v1/videos/{video_id}/content", headers=acme), 409, "video_id", "queued"
    )
    assert error["code"] == "video_not_ready"
    content = run_to_success(settings, s3, video_id, content=bytes(range(256)) * 5000)
    response = client.get(f"/v1/videos/{video_id}/content", headers=acme)
    assert response.status_code == 200
    assert response.headers["content-type"] == "video/mp4"
    assert response.content == content
    assert_error(
        client.get(f"/v1/videos/{video_id}/content?variant=poster", headers=acme),
        400,
        "variant",
        "'thumbnail'",
    )
    redirect = client.get(
        f"/v1/videos/{video_id}/content?redirect=1", headers=acme, follow_redirects=False
    )
    assert redirect.status_code == 307
    assert httpx.get(redirect.headers["location"]).content == content

    s3.delete_object(Bucket=settings.s3_bucket, Key=video_key(video_id, 1))
    assert_error(
        client.get(f"/v1/videos/{video_id}/content", headers=acme),
        404,
        None,
        "no longer stored",
    )


def test_cancel_queued_is_immediate_and_running_is_flagged(client, acme, settings):
    queued = submit(client, acme).json()["id"]
    video = client.post(f"/v1/videos/{queued}/cancel", headers=acme).json()
    assert video["status"] == "failed" and video["error"]["code"] == "cancelled"
    assert events(settings, queued) == [(None, "queued"), ("queued", "cancelled")]

    running = submit(client, acme).json()["id"]
    with session_scope(settings.database_url) as session:
        claim = transitions.claim(session, running, "w1")
    video = client.post(f"/v1/videos/{running}/cancel", headers=acme).json()
    assert video["status"] == "in_progress" and video["cancel_requested"] is True
    with session_scope(settings.database_url) as session:
        beat = transitions.heartbeat(session, running, claim.attempt)
    assert beat.cancel_requested is True


def test_delete_cancels_removes_stored_objects_and_hides_the_video(client, acme, settings, s3):
    ref = ("ref.png", png_bytes(), "image/png")
    video_id = submit(client, acme, model=I2V, input_reference=ref).json()["id"]
    s3.put_object(Bucket=settings.s3_bucket, Key=f"videos/{video_id}/attempt-1.mp4", Body=b"x")
    response = client.delete(f"/v1/videos/{video_id}", headers=acme)
    assert response.status_code == 200
    assert response.json() == {"id": video_id, "object": "video.deleted", "deleted": True}
    job = load_job(settings, video_id)
    assert job.status == "cancelled" and job.deleted_at is not None
    for prefix in (f"videos/{video_id}/", f"inputs/{video_id}/"):
        assert s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix=prefix)["KeyCount"] == 0
    assert_error(client.get(f"/v1/videos/{video_id}", headers=acme), 404, "video_id")
    assert_error(client.delete(f"/v1/videos/{video_id}", headers=acme), 404, "video_id")
    listed = client.get("/v1/videos?limit=100", headers=acme).json()["data"]
    assert video_id not in [v["id"] for v in listed]


# --- models, health, metrics, errors -------------------------------------------------------


def test_models_lists_what_the_config_serves(client, acme, models_toml):
    body = client.get("/v1/models", headers=acme).json()
    assert body["object"] == "list"
    models = {m["id"]: m for m in body["data"]}
    assert set(models) == {T2V, I2V}
    t2v = models[T2V]
    assert (t2v["object"], t2v["owned_by"]) == ("model", "fastvideo-batch")
    assert t2v["created"] == int(models_toml.stat().st_mtime)
    assert (t2v["pipeline"], t2v["pool"], t2v["gpus"]) == ("WanPipeline", T2V_POOL, 1)
    assert (t2v["image_to_video"], t2v["default_size"], t2v["max_frames"]) == (False, "64x64", 33)
    assert models[I2V]["image_to_video"] is True
    assert models[I2V]["pipeline"] == "WanImageToVideoPipeline"


@pytest.fixture(scope="module")
def operator(settings) -> dict[str, str]:
    with session_scope(settings.database_url) as session:
        key = create_api_key(session, "ops", name="tests", operator=True)
    return {"Authorization": f"Bearer {key}"}


def test_healthz_and_readyz_when_everything_is_up(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


def test_readyz_names_stopped_storage_and_app_still_starts(settings, operator):
    dead = f"http://127.0.0.1:{free_port()}"
    app = TestClient(create_app(settings.model_copy(update={"s3_endpoint_url": dead})))
    response = app.get("/readyz")
    error = assert_error(response, 503, None, "storage down")
    assert error["code"] == "not_ready"
    checks = response.json()["checks"]
    # An anonymous probe learns what is down, not where it lives.
    assert checks == {"database": "ok", "broker": "ok", "storage": "down"}
    assert "127.0.0.1" not in response.text
    detailed = app.get("/readyz", headers=operator).json()["checks"]
    assert detailed["storage"].startswith("down:") and dead in detailed["storage"]


def test_stopped_broker_fails_readyz_but_not_submissions(
    client, acme, operator, settings, valkey_server
):
    valkey_server.stop()
    try:
        response = client.get("/readyz", headers=operator)
        assert_error(response, 503, None, "broker down")
        assert response.json()["checks"]["broker"].startswith("down:")
        created = submit(client, acme)
        assert created.status_code == 200, created.text
        job = load_job(settings, created.json()["id"])
        assert job.status == "queued" and job.dispatched_at is None
    finally:
        valkey_server.start()
    assert client.get("/readyz").status_code == 200


def test_hung_broker_does_not_touch_submissions(client, acme, settings, valkey_server):
    """Nothing on the request path talks to the broker: a frozen one changes nothing."""
    valkey_server.pause()  # accepts connections, never answers
    try:
        created = submit(client, acme)
        assert created.status_code == 200, created.text
        batch = client.post(
            "/v1/batches", json={"requests": [{"model": T2V, "prompt": "b"}] * 1000}, headers=acme
        )
        assert batch.status_code == 200, batch.text
        assert load_job(settings, created.json()["id"]).dispatched_at is None
    finally:
        valkey_server.resume()


def test_metrics_need_an_operator_key(client, acme):
    assert_error(client.get("/metrics"), 401, None, "Missing API key")
    error = assert_error(client.get("/metrics", headers=acme), 403, None, "operator key")
    assert error["code"] == "operator_key_required"


def test_metrics_report_jobs_by_status_and_requests(client, acme, operator, settings):
    submit(client, acme)
    response = client.get("/metrics", headers=operator)
    assert response.status_code == 200, response.text
    text = response.text
    with session_scope(settings.database_url) as session:
        queued = len(
            session.execute(
                select(Job.id).where(Job.status == "queued", Job.deleted_at.is_(None))
            ).all()
        )
    assert f'fvb_jobs{{status="queued"}} {float(queued)}' in text
    assert f'fvb_queue_depth{{pool="{T2V_POOL}"}}' in text
    assert 'fvb_http_requests_total{method="POST",route="/v1/videos",status="200"}' in text
    assert 'fvb_http_request_duration_seconds_bucket{le="0.005",method="POST"' in text


def test_framework_errors_use_the_openai_shape(client, acme):
    assert_error(client.get("/v1/nothing-here", headers=acme), 404, None, "Not Found")
    assert_error(client.put("/v1/videos", headers=acme), 405, None, "Method Not Allowed")
    assert_error(client.get("/v1/videos?limit=many", headers=acme), 400, "limit", "integer")


# --- the official SDK against a real server -------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_openai_sdk_round_trip(server_url, keys, settings, s3, broker):
    from openai import NotFoundError, OpenAI
    from openai.types import Video

    with session_scope(settings.database_url) as session:
        key = create_api_key(session, "sdk-user")
    client = OpenAI(base_url=server_url, api_key=key, max_retries=0)

    video = client.videos.create(
        model=T2V,
        prompt="waves crash on a rocky shore",
        size="64x32",
        seconds="2",
        extra_body={"num_inference_steps": 6, "seed": 7, "metadata": {"run": "sdk"}},
    )
    assert isinstance(video, Video)
    assert (video.object, video.status, video.model) == ("video", "queued", T2V)
    assert (video.size, video.seconds, video.progress) == ("64x32", "2", 0)
    assert video.prompt == "waves crash on a rocky shore"
    assert video.model_extra["metadata"] == {"run": "sdk"}
    assert video.model_extra["num_frames"] == 17
    assert load_job(settings, video.id).params["seed"] == 7

    by_url = client.videos.create(
        model=I2V, prompt="a dog", extra_body={"input_reference": data_url(png_bytes((48, 32)))}
    )
    assert load_job(settings, by_url.id).params["input_image_key"] == (
        f"inputs/{by_url.id}/image.png"
    )
    i2v = client.videos.create(
        model=I2V, prompt="a cat", input_reference=("cat.png", png_bytes(), "image/png")
    )
    assert load_job(settings, i2v.id).params["input_image_key"] == f"inputs/{i2v.id}/image.png"

    raw = client.videos.with_raw_response.retrieve(video.id)
    assert raw.headers["openai-poll-after-ms"] == "200"
    assert raw.parse().id == video.id

    more = [client.videos.create(model=T2V, prompt=f"shot {i}").id for i in range(3)]
    first = client.videos.list(limit=2)
    assert [v.id for v in first.data] == [more[2], more[1]]
    assert first.has_more is True
    second = client.videos.list(limit=2, after=first.data[-1].id)
    assert [v.id for v in second.data] == [more[0], i2v.id]
    everything = [v.id for v in client.videos.list(limit=2)]  # auto-pagination
    assert everything == [*reversed(more), i2v.id, by_url.id, video.id]

    cancelled = client.post(f"/videos/{more[0]}/cancel", cast_to=Video)
    assert cancelled.status == "failed" and cancelled.error.code == "cancelled"

    content = run_to_success(settings, s3, more[1], content=b"mp4-bytes" * 1000)
    assert client.videos.poll(more[1]).status == "completed"
    assert client.videos.download_content(more[1]).content == content

    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (video.id, True, "video.deleted")
    with pytest.raises(NotFoundError):
        client.videos.retrieve(video.id)
