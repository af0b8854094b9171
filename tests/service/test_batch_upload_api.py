"""The bulk side of ``/v1/batches`` against the real servers of test_api (migrated SQLite,
Valkey, SeaweedFS): JSONL uploads (streamed, line-numbered errors, item keys that make a
re-run resume), named batches, item pages, progress, the manifest and retry_failed."""

# api_fixtures' module fixtures are injected by name (registered by the conftest).

from __future__ import annotations

import hashlib
import json
import threading
import urllib.request

import httpx
import pytest

from fvb_core.api_keys import create_api_key
from fvb_core.db import transitions
from fvb_core.db.session import session_scope
from fvb_core.manifest import COLUMN_NAMES, LINE_KEY
from scheduler.api import batches, upload

from .api_fixtures import T2V, assert_error, run_to_success

pytestmark = pytest.mark.timeout(120)

NDJSON = {"Content-Type": "application/x-ndjson"}


def line(n: int, tag: str, **fields) -> dict:
    """Line ``n`` as ``fvb bulk submit`` sends it: a video body, its item key (unique per
    tenant, so each test tags its own), its line number."""
    body = {"model": T2V, "prompt": f"shot {n}", "seed": n, "metadata": {LINE_KEY: str(n)}}
    return {**body, "item_key": f"{tag}-{n}", **fields}


def jsonl(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def numbered(tag: str, *numbers: int) -> bytes:
    return jsonl(*(line(n, tag) for n in numbers))


def post_jsonl(client, headers, body, batch_id=None, **query):
    url = f"/v1/batches/{batch_id}/videos" if batch_id else "/v1/batches"
    response = client.post(url, content=body, params=query, headers={**headers, **NDJSON})
    assert response.status_code == 200, response.text
    return response.json()


def all_items(client, headers, batch_id, limit=1000) -> list[dict]:
    items, after = [], None
    while True:
        params = {"limit": limit, **({"after": after} if after else {})}
        page = client.get(f"/v1/batches/{batch_id}/items", params=params, headers=headers).json()
        assert len(page["data"]) <= limit
        items += page["data"]
        if not page["has_more"]:
            return items
        after = page["last_id"]


def tenant(settings, name: str, max_queued: int | None = None) -> dict[str, str]:
    with session_scope(settings.database_url) as session:
        key = create_api_key(session, name, max_queued=max_queued)
    return {"Authorization": f"Bearer {key}"}


def test_jsonl_upload_creates_a_named_batch_and_reports_bad_lines_by_number(client, acme, globex):
    body = jsonl(
        line(1, "named"),
        line(2, "named", size="33x32"),  # a bad field
        b"",  # blank lines are skipped, yet counted in the numbering
        b'{"prompt": "unterminated',  # not JSON
        "just a prompt",  # a prompt alone: two models are served, so the model is missing
        line(6, "named"),
        b"   ",
        line(8, "named", item_key=""),  # item keys are 1..255 characters
        line(9, "named"),
    )
    made = post_jsonl(client, acme, body, name="pandas-v1", retention_seconds=3600)
    assert (made["object"], made["name"], made["retention_seconds"]) == (
        "batch", "pandas-v1", 3600
    )  # fmt: skip
    done = made["upload"]
    assert (done["lines"], done["created"], done["existing"], done["error_count"]) == (7, 3, 0, 4)
    errors = {e["line"]: e["error"] for e in done["errors"]}
    assert sorted(errors) == [2, 4, 5, 8]
    assert errors[2]["param"] == "size" and errors[2]["message"].startswith("line 2: ")
    assert errors[4]["code"] == "invalid_json" and errors[4]["message"].startswith("line 4: ")
    assert (errors[5]["param"], errors[5]["code"]) == ("model", "missing")
    assert errors[8]["param"] == "item_key"
    assert made["request_counts"]["total"] == made["request_counts"]["queued"] == 3
    items = all_items(client, acme, made["id"])
    assert sorted((i["item_key"], i["line"], i["seed"]) for i in items) == [
        ("named-1", 1, 1), ("named-6", 6, 6), ("named-9", 9, 9)
    ]  # fmt: skip
    assert {i["status"] for i in items} == {"queued"}

    # Found by name, per tenant; the name is taken for a JSONL or a JSON create.
    found = client.get("/v1/batches", params={"name": "pandas-v1"}, headers=acme).json()
    assert [b["id"] for b in found["data"]] == [made["id"]]
    assert client.get("/v1/batches?name=pandas-v1", headers=globex).json()["data"] == []
    assert client.get("/v1/batches?name=pandas-v2", headers=acme).json()["data"] == []
    assert_error(client.get("/v1/batches?name=bad name", headers=acme), 400, "name")
    for again in (
        client.post(
            "/v1/batches?name=pandas-v1",
            content=jsonl(line(1, "named")),
            headers={**acme, **NDJSON},
        ),
        client.post("/v1/batches", json={"name": "pandas-v1"}, headers=acme),
    ):
        error = assert_error(again, 409, "name", made["id"])
        assert error["code"] == "batch_name_taken"
    assert len(all_items(client, acme, made["id"])) == 3
    listed = client.get("/v1/batches?limit=100", headers=acme).json()["data"]
    assert [b["name"] for b in listed].count("pandas-v1") == 1
    theirs = post_jsonl(client, globex, numbered("named", 1), name="pandas-v1")
    assert theirs["upload"]["created"] == 1

    # Query options are for JSONL bodies and are checked like the JSON body's fields.
    refused = client.post("/v1/batches?name=x", json={}, headers=acme)
    assert_error(refused, 400, "name", "JSON body")
    for bad in ({"retention_seconds": 0}, {"retention_seconds": -5}, {"name": ""}):
        response = client.post("/v1/batches", params=bad, content=b"", headers={**acme, **NDJSON})
        assert_error(response, 400, next(iter(bad)))


def test_jsonl_append_with_item_keys_resumes_without_duplicates(client, acme):
    batch = client.post("/v1/batches", headers=acme).json()["id"]
    first = post_jsonl(client, acme, numbered("resume", 1, 2, 3), batch)["upload"]
    assert (first["created"], first["existing"], first["error_count"]) == (3, 0, 0)
    ids = {i["item_key"]: i["id"] for i in all_items(client, acme, batch)}
    # The re-run sends everything again plus one more line: only that one is new.
    again = post_jsonl(client, acme, numbered("resume", 1, 2, 3, 4), batch)
    assert (again["upload"]["created"], again["upload"]["existing"]) == (1, 3)
    assert again["request_counts"]["total"] == 4
    after = {i["item_key"]: i["id"] for i in all_items(client, acme, batch)}
    assert {k: after[k] for k in ids} == ids and len(after) == 4
    # One key with another body is that line's error, not a second video.
    changed = post_jsonl(client, acme, jsonl(line(5, "resume"), line(2, "resume", seed=99)), batch)
    changed = changed["upload"]
    assert (changed["created"], changed["error_count"]) == (1, 1)
    (error,) = changed["errors"]
    assert error["line"] == 2 and error["error"]["code"] == "idempotency_key_reused"
    # Two lines of one chunk with one key: the chunk is refused line by line (documented).
    dup = jsonl(line(6, "resume", item_key="d"), line(7, "resume"), line(8, "resume", item_key="d"))
    twice = post_jsonl(client, acme, dup, batch)
    assert (twice["upload"]["created"], twice["upload"]["error_count"]) == (0, 3)
    assert [e["line"] for e in twice["upload"]["errors"]] == [1, 2, 3]
    assert "share an item_key" in twice["upload"]["errors"][0]["error"]["message"]
    assert len(all_items(client, acme, batch)) == 5
    assert_error(
        client.post(
            "/v1/batches/batch_nope/videos",
            content=jsonl(line(1, "resume")),
            headers={**acme, **NDJSON},
        ),
        404,
        "batch_id",
    )


def test_a_chunk_past_the_queue_limit_stops_the_upload_keeping_earlier_chunks(client, settings):
    tight = tenant(settings, "bulk-tight", max_queued=upload.CHUNK + 10)
    body = numbered("tight", *range(1, upload.CHUNK + 101))
    refused = client.post("/v1/batches?name=tight", content=body, headers={**tight, **NDJSON})
    error = assert_error(refused, 429, None, f"lines before {upload.CHUNK + 1} are stored")
    assert error["code"] == "queue_full" and int(refused.headers["Retry-After"]) > 0
    (batch,) = client.get("/v1/batches?name=tight", headers=tight).json()["data"]
    assert batch["request_counts"]["total"] == upload.CHUNK
    # Room again (200 of them finished): the same upload sent again resumes by item key.
    with session_scope(settings.database_url) as session:
        for item in all_items(client, tight, batch["id"])[:200]:
            claim = transitions.claim(session, item["id"], "test-worker")
            transitions.fail(session, item["id"], claim.attempt, "oom", "out of memory")
    resumed = post_jsonl(client, tight, body, batch["id"])["upload"]
    assert (resumed["created"], resumed["existing"]) == (100, upload.CHUNK)


def test_a_large_upload_is_stored_chunk_by_chunk_as_it_streams(server_url, acme, monkeypatch):
    total, stored_chunks = 5000, []
    produced = 0
    first_chunk_stored = threading.Event()
    real_append = batches.append

    def append(session, context, principal, batch_id, body):
        stored_chunks.append((len(body["requests"]), produced))
        first_chunk_stored.set()
        return real_append(session, context, principal, batch_id, body)

    monkeypatch.setattr(batches, "append", append)

    def body():
        nonlocal produced
        for n in range(1, total + 1):
            if n == 2 * upload.CHUNK + 1:
                # A handler that read the whole body first would never store a chunk here.
                assert first_chunk_stored.wait(15), "nothing stored before the body ended"
            produced = n
            yield json.dumps(line(n, "big")).encode() + b"\n"

    with httpx.Client(base_url=server_url, headers=acme, timeout=60) as http:
        response = http.post("/batches?name=big", content=body(), headers=NDJSON)
        assert response.status_code == 200, response.text
        made = response.json()
        assert (made["upload"]["lines"], made["upload"]["created"]) == (total, total)
        assert made["request_counts"]["total"] == total
        # Never more than a chunk held; the first one stored long before the body ended.
        assert [size for size, _ in stored_chunks] == [upload.CHUNK] * (total // upload.CHUNK)
        assert stored_chunks[0][1] <= 2 * upload.CHUNK

        pages = 0
        items, after = [], None
        while True:
            params = {"limit": 1000, **({"after": after} if after else {})}
            page = http.get(f"/batches/{made['id']}/items", params=params).json()
            pages += 1
            items += page["data"]
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert pages == 5 and len({i["id"] for i in items}) == total
        assert [i["id"] for i in items] == sorted(i["id"] for i in items)
        assert sorted((i["line"], i["seed"], i["item_key"]) for i in items) == [
            (n, n, f"big-{n}") for n in range(1, total + 1)
        ]
        for limit in (1001, 0):
            bad = http.get(f"/batches/{made['id']}/items", params={"limit": limit})
            assert_error(bad, 400, "limit")


def fail(settings, job_id: str, code: str) -> None:
    with session_scope(settings.database_url) as session:
        claim = transitions.claim(session, job_id, "test-worker")
        assert transitions.fail(session, job_id, claim.attempt, code, f"{code} happened")


def test_progress_and_the_manifest_follow_the_videos(client, acme, settings, s3):
    made = post_jsonl(client, acme, numbered("manifest", 1, 2, 3))
    batch = made["id"]
    progress = client.get(f"/v1/batches/{batch}", headers=acme).json()["progress"]
    assert progress == {
        "window_seconds": batches.RATE_WINDOW_S,
        "finished_in_window": 0,
        "videos_per_second": 0.0,
        "eta_seconds": None,
    }
    ids = {i["item_key"]: i["id"] for i in all_items(client, acme, batch)}
    content = run_to_success(settings, s3, ids["manifest-1"], content=b"manifest-mp4" * 500)
    fail(settings, ids["manifest-2"], "oom")
    progress = client.get(f"/v1/batches/{batch}", headers=acme).json()["progress"]
    rate = 2 / batches.RATE_WINDOW_S
    assert progress["finished_in_window"] == 2
    assert progress["videos_per_second"] == round(rate, 4)
    assert progress["eta_seconds"] == round(1 / rate)  # one video left at that rate

    response = client.get(f"/v1/batches/{batch}/manifest", headers=acme)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    rows = [json.loads(raw) for raw in response.text.splitlines()]
    assert all(list(row) == list(COLUMN_NAMES) for row in rows)
    by_key = {row["item_key"]: row for row in rows}
    assert sorted(by_key) == ["manifest-1", "manifest-2", "manifest-3"]
    done = by_key["manifest-1"]
    assert (done["status"], done["video_id"], done["batch_id"]) == (
        "completed",
        ids["manifest-1"],
        batch,
    )
    assert (done["line"], done["seed"], done["prompt"], done["model"]) == (1, 1, "shot 1", T2V)
    assert done["sha256"] == hashlib.sha256(content).hexdigest()
    assert done["bytes"] == len(content) and done["attempts"] == 1
    key = f"videos/{ids['manifest-1']}/attempt-1.mp4"
    assert done["storage_uri"] == f"s3://{settings.s3_bucket}/{key}"
    with urllib.request.urlopen(done["url"], timeout=10) as fetched:  # presigned, no auth
        assert fetched.read() == content
    failed = by_key["manifest-2"]
    assert (failed["status"], failed["error_code"]) == ("failed", "oom")
    assert failed["url"] is failed["sha256"] is failed["storage_uri"] is None
    assert by_key["manifest-3"]["status"] == "queued" and by_key["manifest-3"]["url"] is None
    assert_error(
        client.get(f"/v1/batches/{batch}/manifest", headers=tenant(settings, "x")), 404, "batch_id"
    )


def test_retry_failed_queues_failed_videos_again_as_the_same_items(client, acme, globex, settings):
    made = post_jsonl(client, acme, numbered("retry", 1, 2, 3, 4))
    batch = made["id"]
    ids = {i["item_key"]: i["id"] for i in all_items(client, acme, batch)}
    fail(settings, ids["retry-1"], "oom")
    fail(settings, ids["retry-2"], "oom")
    fail(settings, ids["retry-3"], "nsfw")
    assert_error(client.post(f"/v1/batches/{batch}/retry_failed", headers=globex), 404, "batch_id")
    bad = client.post(f"/v1/batches/{batch}/retry_failed", params={"code": "x" * 65}, headers=acme)
    assert_error(bad, 400, "code")

    url = f"/v1/batches/{batch}/retry_failed"
    oom = client.post(url, params={"code": "oom"}, headers=acme)
    assert oom.status_code == 200, oom.text
    answer = oom.json()
    assert sorted(answer["retried"]) == sorted([ids["retry-1"], ids["retry-2"]])
    assert answer["id"] == batch
    counts = answer["request_counts"]
    assert (counts["total"], counts["queued"], counts["failed"]) == (4, 3, 1)
    items = {i["item_key"]: i for i in all_items(client, acme, batch)}
    assert {k: i["id"] for k, i in items.items()} == ids
    assert items["retry-1"]["status"] == "queued" and items["retry-1"]["error"] is None
    assert items["retry-3"]["status"] == "failed" and items["retry-3"]["error"]["code"] == "nsfw"
    # A new attempt of the same video.
    with session_scope(settings.database_url) as session:
        assert transitions.claim(session, ids["retry-1"], "test-worker").attempt == 2

    rest = client.post(url, headers=acme).json()
    assert rest["retried"] == [ids["retry-3"]] and rest["request_counts"]["failed"] == 0
    assert client.post(url, headers=acme).json()["retried"] == []
    client.post(f"/v1/batches/{batch}/cancel", headers=acme)
    assert_error(client.post(url, headers=acme), 409, "batch_id", "cancelled")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_openai_sdk_reads_a_batch_video_as_any_video(server_url, client, keys):
    from openai import OpenAI
    from openai.types import Video

    headers = {"Authorization": f"Bearer {keys['acme']}"}
    made = post_jsonl(client, headers, jsonl(line(1, "sdk", size="64x32", seconds="2")))
    (item,) = all_items(client, headers, made["id"])
    sdk = OpenAI(base_url=server_url, api_key=keys["acme"], max_retries=0)
    video = sdk.videos.retrieve(item["id"])
    assert isinstance(video, Video)
    assert (video.id, video.status, video.model, video.size) == (item["id"], "queued", T2V, "64x32")
    assert video.model_extra["batch_id"] == made["id"]
