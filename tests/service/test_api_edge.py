"""The API under bad input and faults, with real servers: text no layer can store, bodies
too big or too deep, numbers in other scripts, a database that is down, a store that hangs,
wrong keys in a loop, 500s on a kept-alive connection; and what the API promises besides:
request ids, the OpenAI error shape for operations it does not offer, model limits checked
at create, the OpenAPI schema (checked with schemathesis), previews of a video."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from fvb_core.api_keys import create_api_key
from fvb_core.db.migrate import upgrade
from fvb_core.db.models import Job
from fvb_core.db.session import session_scope
from fvb_core.storage import spritesheet_key, thumbnail_key
from fvb_tools.localstack import start_postgres
from fvb_tools.localstack.ports import free_port
from fvb_tools.localstack.process import die_with_parent
from scheduler.api.app import ConfigurationError, create_app

from .api_fixtures import T2V, assert_error, run_to_success, serve, submit

pytestmark = pytest.mark.timeout(180)


def job_count(settings) -> int:
    with session_scope(settings.database_url) as session:
        return session.execute(select(func.count()).select_from(Job)).scalar_one()


def post_raw(client, path: str, raw: bytes, headers, content_type="application/json"):
    return client.post(path, content=raw, headers={**headers, "Content-Type": content_type})


# --- text no layer can store -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"model": "tiny-t2v", "prompt": "x\\ud800y"}', "prompt"),
        ('{"model": "tiny-t2v", "prompt": "p", "negative_prompt": "\\udfff"}', "negative_prompt"),
        ('{"model": "tiny-t2v", "prompt": "p", "metadata": {"shot": "a\\ud83d"}}', "metadata.shot"),
        ('{"model": "tiny-t2v", "prompt": "p", "metadata": {"k\\ud800": "v"}}', "metadata"),
    ],
)
def test_a_lone_surrogate_is_400_and_nothing_is_stored(client, acme, settings, body, param):
    before = job_count(settings)
    response = post_raw(client, "/v1/videos", body.encode(), acme)
    error = assert_error(response, 400, param, "lone surrogate")
    assert error["code"] == "invalid_text"
    assert job_count(settings) == before
    # The tenant's list still works (it used to answer 500 until the job was deleted).
    assert client.get("/v1/videos", headers=acme).status_code == 200
    batch = post_raw(client, "/v1/batches", f'{{"requests": [{body}]}}'.encode(), acme)
    assert_error(batch, 400, f"requests[0].{param}", "lone surrogate")
    assert job_count(settings) == before


# --- numbers and nesting -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("seed", "1" + "0" * 400, "between 0 and"),
        ("num_frames", "9" * 300, "above the maximum"),
        ("guidance_scale", "1e400", "finite number"),
        ("fps", "-" + "7" * 200, "between 1 and 120"),
    ],
)
def test_numbers_too_big_for_a_float_are_400(client, acme, field, value, fragment):
    raw = f'{{"model": "{T2V}", "prompt": "p", "{field}": {value}}}'.encode()
    error = assert_error(post_raw(client, "/v1/videos", raw, acme), 400, field, fragment)
    assert len(error["message"]) < 300  # the number is not echoed whole


@pytest.mark.parametrize("path", ["/v1/videos", "/v1/batches"])
def test_deep_nesting_and_non_json_numbers_are_400(client, acme, path):
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert_error(post_raw(client, path, deep, acme), 400, None, "nests deeper")
    assert_error(post_raw(client, path, b"[" * 100_000, acme), 400, None, "nests deeper")
    nan = b'{"model": "tiny-t2v", "prompt": "p", "seed": NaN}'
    assert_error(post_raw(client, path, nan, acme), 400, None, "NaN is not a JSON number")
    digits = b'{"prompt": "p", "seed": ' + b"7" * 5000 + b"}"
    assert_error(post_raw(client, path, digits, acme), 400, None, "not valid JSON")


def test_only_plain_utf8_json_and_ascii_digits_are_accepted(client, acme, settings):
    before = job_count(settings)
    body = json.dumps({"model": T2V, "prompt": "a cat"})
    for encoding in ("utf-16", "utf-32"):
        response = post_raw(client, "/v1/videos", body.encode(encoding), acme)
        assert_error(response, 400, None, "not UTF-8")
    response = post_raw(
        client, "/v1/videos", body.encode(), acme, "application/json; charset=utf-16"
    )
    assert_error(response, 400, None, "UTF-8 JSON, not utf-16")
    wide = json.dumps({"model": T2V, "prompt": "p", "size": "６４x６４"}).encode()
    assert_error(post_raw(client, "/v1/videos", wide, acme), 400, "size", "ASCII digits")
    form = submit(client, acme, num_frames="１７")
    assert_error(form, 400, "num_frames", "integer")
    form = submit(client, acme, guidance_scale="５.０")
    assert_error(form, 400, "guidance_scale", "number")
    assert job_count(settings) == before


# --- body limits --------------------------------------------------------------------------------


def _read_response(sock: socket.socket) -> tuple[int, bytes, bytes]:
    """(status, head, body) of one HTTP/1.1 answer with a Content-Length, read off ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the body"
        body += chunk
    return int(head.split(b" ", 2)[1]), head, body


def test_a_batch_body_over_the_limit_is_refused_before_it_is_read(settings, keys, monkeypatch):
    monkeypatch.setattr("scheduler.api.routes.batches.MAX_BATCH_BODY_BYTES", 1 << 20)
    with serve(create_app(settings)) as port:
        auth = f"Authorization: Bearer {keys['acme']}\r\n".encode()
        # Declared 200 MB: refused on the headers alone, no byte of the body sent.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + auth
                + b"Content-Length: 200000000\r\n\r\n"
            )
            status, head, body = _read_response(sock)
            assert status == 413, head
            assert json.loads(body)["error"]["code"] == "request_too_large"
        # Chunked, no length: refused once the limit passes, while the sender still has more.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + auth
                + b"Transfer-Encoding: chunked\r\n\r\n"
            )
            piece = b"x" * 65536
            for _ in range(24):  # 1.5 MiB of a body that never ends
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            status, head, body = _read_response(sock)
            assert status == 413, head
            assert b"at most 1048576 bytes" in body


# --- errors keep the connection; the database down -----------------------------------------------


def test_a_500_is_answered_in_the_error_shape_and_keeps_the_connection(settings, keys, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("scheduler.api.routes.videos.jobs.list_page", broken)
    with serve(create_app(settings)) as port:
        request = (
            f"GET {{path}} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {keys['acme']}\r\n"
            "X-Request-ID: trace-42\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request.format(path="/v1/videos").encode())
            status, head, body = _read_response(sock)
            assert status == 500, head
            assert b"x-request-id: trace-42" in head.lower()
            assert b"connection: close" not in head.lower()
            error = json.loads(body)["error"]
            assert error["code"] == "internal_error" and "trace-42" in error["message"]
            # The same connection serves the next request.
            sock.sendall(request.format(path="/v1/models").encode())
            status, head, _body = _read_response(sock)
            assert status == 200, head


@pytest.fixture
def postgres_settings(settings, tmp_path):
    """The API's settings on a PostgreSQL of its own (this test stops it)."""
    server = start_postgres(tmp_path / "pg")
    try:
        upgrade(server.url)
        yield server, settings.model_copy(update={"database_url": server.url})
    finally:
        server.stop()


def test_database_down_is_503_with_retry_after_and_recovers(postgres_settings):
    server, pg_settings = postgres_settings
    with session_scope(pg_settings.database_url) as session:
        key = {"Authorization": f"Bearer {create_api_key(session, 'acme')}"}
    client = TestClient(create_app(pg_settings))
    assert client.get("/v1/videos", headers=key).status_code == 200
    server.stop()
    for method, path in [("GET", "/v1/videos"), ("GET", "/v1/models"), ("GET", "/v1/batches")]:
        response = client.request(method, path, headers=key)
        error = assert_error(response, 503, None, "database is unavailable")
        assert error["code"] == "database_unavailable"
        assert int(response.headers["retry-after"]) > 0
    created = submit(client, key)
    assert created.status_code == 503 and created.headers["retry-after"]
    assert client.get("/healthz").status_code == 200
    server.start()
    assert client.get("/v1/videos", headers=key).status_code == 200


# --- a hung store -------------------------------------------------------------------------------


def test_a_hung_store_never_stalls_healthz_and_downloads_fail_fast(settings, keys, s3, s3_server):
    tight = settings.model_copy(
        update={"request_store_timeout_s": 1.0, "max_concurrent_downloads": 4}
    )
    app = create_app(tight)
    acme_key = {"Authorization": f"Bearer {keys['acme']}"}
    local = TestClient(app)
    video_id = submit(local, acme_key).json()["id"]
    run_to_success(settings, s3, video_id, content=b"\x00" * 4096)
    with serve(app) as port:
        base = f"http://127.0.0.1:{port}"
        s3_server.pause()
        try:
            with ThreadPoolExecutor(60) as pool:
                downloads = [
                    pool.submit(
                        httpx.get,
                        f"{base}/v1/videos/{video_id}/content",
                        headers=acme_key,
                        timeout=60,
                    )
                    for _ in range(60)
                ]
                # While the downloads wait on the frozen store, liveness still answers.
                assert httpx.get(f"{base}/healthz", timeout=5).json() == {"status": "ok"}
                answers = [future.result() for future in downloads]
        finally:
            s3_server.resume()
    codes = [answer.json()["error"]["code"] for answer in answers]
    assert {answer.status_code for answer in answers} == {503}
    assert set(codes) <= {"storage_unavailable", "too_many_downloads"}
    assert codes.count("too_many_downloads") >= 60 - 4 * 3, codes
    assert all(answer.headers["retry-after"] for answer in answers)


# --- keys ---------------------------------------------------------------------------------------


def test_wrong_keys_are_throttled_per_client_address(settings, keys):
    app = create_app(settings.model_copy(update={"auth_failures_per_minute": 20}))
    attacker = TestClient(app, client=("203.0.113.5", 4000))
    statuses = [
        attacker.get("/v1/videos", headers={"Authorization": f"Bearer fvb-guess-{i}"}).status_code
        for i in range(30)
    ]
    assert statuses == [401] * 20 + [429] * 10
    throttled = attacker.get("/v1/videos", headers={"Authorization": "Bearer fvb-guess"})
    error = assert_error(throttled, 429, None, "wrong API key from 203.0.113.5")
    assert error["code"] == "too_many_auth_failures"
    assert 0 < int(throttled.headers["retry-after"]) <= 60
    # Until the window passes even a right key from there waits: the limit is on the address.
    assert (
        attacker.get("/v1/videos", headers={"Authorization": f"Bearer {keys['acme']}"}).status_code
        == 429
    )
    neighbour = TestClient(app, client=("203.0.113.6", 4000))
    assert neighbour.get("/v1/videos", headers={"Authorization": "Bearer fvb-x"}).status_code == 401
    assert (
        neighbour.get("/v1/videos", headers={"Authorization": f"Bearer {keys['acme']}"}).status_code
        == 200
    )


# --- request ids and methods --------------------------------------------------------------------


def test_every_answer_carries_a_request_id(client, acme):
    answers = [
        client.get("/v1/models", headers=acme),
        client.get("/v1/models"),
        client.get("/v1/videos/nope", headers=acme),
        client.get("/v1/videos?limit=0", headers=acme),
        client.put("/v1/videos", headers=acme),
        client.get("/healthz"),
    ]
    ids = [answer.headers["x-request-id"] for answer in answers]
    assert [a.status_code for a in answers] == [200, 401, 404, 400, 405, 200]
    assert all(re.fullmatch(r"req_[0-9a-f]{24}", i) for i in ids) and len(set(ids)) == len(ids)
    echoed = client.get("/v1/models", headers={**acme, "X-Request-ID": "batch-7.line:3"})
    assert echoed.headers["x-request-id"] == "batch-7.line:3"
    replaced = client.get("/v1/models", headers={**acme, "X-Request-ID": "no spaces <here>"})
    assert replaced.headers["x-request-id"].startswith("req_")


def test_a_wrong_method_names_every_allowed_one(client, acme):
    response = client.put("/v1/videos", headers=acme)
    assert response.status_code == 405 and response.headers["allow"] == "GET, POST"
    response = client.patch("/v1/videos/video_x", headers=acme)
    assert response.headers["allow"] == "DELETE, GET"


# --- operations this service does not offer --------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_unsupported_openai_operations_answer_in_the_openai_error_shape(settings, keys):
    from openai import BadRequestError, OpenAI

    with serve(create_app(settings)) as port:
        sdk = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=keys["acme"], max_retries=0)
        clip = ("clip.mp4", b"\x00mp4", "video/mp4")
        calls = {
            "Remixing a video": lambda: sdk.videos.remix("video_x", prompt="again"),
            "Editing a video": lambda: sdk.videos.edit(prompt="x", video=clip),
            "Extending a video": lambda: sdk.videos.extend(prompt="x", seconds="4", video=clip),
            "Creating a character": lambda: sdk.videos.create_character(
                name="c", video=("c.mp4", b"x", "video/mp4")
            ),
            "Reading a character": lambda: sdk.videos.get_character("char_1"),
        }
        for operation, call in calls.items():
            with pytest.raises(BadRequestError) as raised:
                call()
            assert raised.value.code == "unsupported_operation"
            assert raised.value.body["message"].startswith(f"{operation} is not supported")


# --- what the model can render is checked at create ------------------------------------------


@pytest.fixture(scope="module")
def roomy(tmp_path_factory, tiny_t2v, settings) -> TestClient:
    """The tiny model with every configured limit above what its rotary table reaches."""
    path = tmp_path_factory.mktemp("roomy") / "models.toml"
    path.write_text(
        f'[models."{T2V}"]\npath = "{tiny_t2v}"\npool = "roomy"\ndefault_size = "64x64"\n'
        "max_frames = 301\nmax_pixels = 4000000\n"
    )
    return TestClient(create_app(settings.model_copy(update={"models_config": path})))


def test_sizes_and_frames_beyond_the_rotary_table_are_refused_at_create(roomy, acme, settings):
    models = {m["id"]: m for m in roomy.get("/v1/models", headers=acme).json()["data"]}
    side = models[T2V]["max_side"]
    assert side == 32 * 16  # rope_max_seq_len 32 patches of 8 px x patch 2
    before = job_count(settings)
    for size in ("1280x720", f"{side + 16}x64", f"64x{side + 16}"):
        error = assert_error(submit(roomy, acme, size=size), 400, "size", "rotary table")
        assert "rope_max_seq_len" in error["message"]
    error = assert_error(submit(roomy, acme, num_frames="129"), 400, "num_frames", "maximum of 125")
    assert job_count(settings) == before
    assert submit(roomy, acme, size=f"{side}x16", num_frames="125").status_code == 200


def test_the_limits_are_the_engines_own(tiny_t2v):
    """The largest size the API accepts renders; one patch more is what the engine refuses."""
    from fastvideo import VideoGenerator
    from fvb_core.models_config import ServedModel, _inspect_folder

    served = ServedModel(name="t", path=Path(tiny_t2v), **_inspect_folder(Path(tiny_t2v)))
    generator = VideoGenerator.from_pretrained(tiny_t2v, device="cpu")
    small = dict(num_frames=5, num_inference_steps=1, seed=0, progress=False)
    result = generator.generate_video("p", width=served.max_side, height=16, **small)
    assert result.frames.shape[1:3] == (16, served.max_side)
    assert served.size_problem(served.max_side + 16, 16) is not None
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        generator.generate_video("p", width=served.max_side + 16, height=16, **small)


def test_a_models_config_whose_defaults_the_model_cannot_render_does_not_start(
    settings, tiny_t2v, tmp_path
):
    path = tmp_path / "models.toml"
    path.write_text(f'[models."big"]\npath = "{tiny_t2v}"\ndefault_size = "1280x720"\n')
    with pytest.raises(ConfigurationError, match=r"default_size 1280x720: .*rotary table"):
        create_app(settings.model_copy(update={"models_config": path}))
    # Without a default_size, the default is cut down to what the model places.
    path.write_text(f'[models."big"]\npath = "{tiny_t2v}"\n')
    app = TestClient(create_app(settings.model_copy(update={"models_config": path})))
    with session_scope(settings.database_url) as session:
        key = create_api_key(session, "cfg")
    model = app.get("/v1/models/big", headers={"Authorization": f"Bearer {key}"}).json()
    assert model["default_size"] == "512x480"


@pytest.mark.parametrize(
    ("fields", "frames", "seconds"),
    [
        ({}, 33, "4"),  # the default 4 s at the model's 8 fps
        ({"seconds": "2"}, 17, "2"),
        ({"seconds": "1.3", "fps": "16"}, 21, "1.25"),
        ({"num_frames": "9", "fps": "8"}, 9, "1"),
        ({"num_frames": "1"}, 1, "0"),
    ],
)
def test_seconds_shown_is_the_duration_rendered(client, acme, fields, frames, seconds):
    video = submit(client, acme, **fields).json()
    assert (video["num_frames"], video["seconds"]) == (frames, seconds)
    # Asking for what was shown renders the same frames again.
    again = submit(client, acme, seconds=seconds, fps=str(video["fps"])).json()
    if frames > 1:
        assert again["num_frames"] == frames


# --- previews ---------------------------------------------------------------------------------


def test_thumbnail_and_spritesheet_variants_serve_the_stored_previews(client, acme, settings, s3):
    video_id = submit(client, acme).json()["id"]
    run_to_success(settings, s3, video_id)
    missing = client.get(f"/v1/videos/{video_id}/content?variant=thumbnail", headers=acme)
    assert_error(missing, 404, "variant", "thumbnail", "not stored")
    for key, body in (
        (thumbnail_key(video_id, 1), b"RIFFwebp"),
        (spritesheet_key(video_id, 1), b"\xff\xd8jpg"),
    ):
        s3.put_object(Bucket=settings.s3_bucket, Key=key, Body=body)
    thumbnail = client.get(f"/v1/videos/{video_id}/content?variant=thumbnail", headers=acme)
    assert thumbnail.status_code == 200 and thumbnail.content == b"RIFFwebp"
    assert thumbnail.headers["content-type"] == "image/webp"
    assert thumbnail.headers["content-length"] == "8"
    sheet = client.get(f"/v1/videos/{video_id}/content?variant=spritesheet", headers=acme)
    assert sheet.headers["content-type"] == "image/jpeg" and sheet.content == b"\xff\xd8jpg"


# --- the schema describes what the API does ---------------------------------------------------


def test_openapi_describes_the_create_body_and_the_errors(client):
    schema = client.get("/openapi.json").json()
    create = schema["paths"]["/v1/videos"]["post"]
    content = create["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    fields = content["multipart/form-data"]["schema"]["properties"]
    assert fields["input_reference"]["format"] == "binary"
    assert {"model", "prompt", "size", "seconds", "seed", "metadata"} <= set(fields)
    assert {"400", "401", "404", "409", "413", "415", "429", "503"} <= set(create["responses"])
    assert "/v1/videos/{video_id}/remix" not in schema["paths"]


def test_the_api_conforms_to_its_openapi_schema(settings, keys, tmp_path):
    """schemathesis against a real server: statuses, content types, response bodies and
    headers as documented, bad input refused, no 5xx. Left out: 'schema-valid requests are
    accepted' (a size must also suit the model, a cursor must name a row: rules JSON Schema
    cannot state, tested one by one in test_api) and strings UTF-8 cannot encode (refused on
    purpose, tested above)."""
    with serve(create_app(settings)) as port:
        run = subprocess.run(
            [
                sys.executable, "-m", "schemathesis.cli", "run",
                f"http://127.0.0.1:{port}/openapi.json",
                "-H", f"Authorization: Bearer {keys['acme']}",
                "--checks", "all",
                "--exclude-checks", "ignored_auth,positive_data_acceptance",
                "--generation-codec", "utf-8",
                "--max-examples", "10",
                "--seed", "1",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=170,
            cwd=tmp_path,  # its .schemathesis/ state stays out of the repository
            preexec_fn=die_with_parent(),
        )  # fmt: skip
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert re.search(r"\d+ generated, \d+ passed", run.stdout), run.stdout[-3000:]


def _non_loopback_address() -> str | None:
    import ipaddress

    import psutil

    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if (
                address.family == socket.AF_INET
                and not ipaddress.ip_address(address.address).is_loopback
            ):
                return address.address
    return None


def test_uvicorn_on_all_interfaces_without_auth_serves_only_loopback(settings, tmp_path):
    """The command scheduler/api/README.md shows, with auth off and --host 0.0.0.0."""
    outside = _non_loopback_address()
    if outside is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FVB_")},
        "FVB_AUTH_ENABLED": "false",
        "FVB_DATABASE_URL": settings.database_url,
        "FVB_MODELS_CONFIG": str(settings.models_config),
        "FVB_BROKER_URL": settings.broker_url,
        "FVB_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "FVB_S3_ACCESS_KEY": settings.s3_access_key,
        "FVB_S3_SECRET_KEY": settings.s3_secret_key,
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "scheduler.api.app:create_app",
         "--host", "0.0.0.0", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, "uvicorn exited"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 200
        for path in ("/v1/models", "/v1/videos", "/metrics"):
            response = httpx.get(f"http://{outside}:{port}{path}", timeout=10)
            error = assert_error(response, 403, None, "loopback")
            assert error["code"] == "loopback_only"
    finally:
        server.terminate()
        server.wait(timeout=30)
