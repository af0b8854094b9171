"""Webhooks: the outbox written by the transitions, delivered at least once by
``scheduler.webhooks.run_pass`` to real HTTP receivers on loopback, signed, with SSRF checks,
no redirects and short timeouts.

The receivers are ``http.server`` threads on 127.0.0.1 (the module's allow-list names it).
Backoff and the receiver's ten minutes down are played with ``run_pass(now=...)``: each pass
runs at the next due time, nothing sleeps.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from contextlib import suppress
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, func, select

from fvb_core import webhook_urls
from fvb_core.api_keys import create_api_key
from fvb_core.db import outbox, transitions
from fvb_core.db.migrate import upgrade
from fvb_core.db.models import Batch, Job, Webhook, WebhookEvent, utcnow
from fvb_core.db.session import session_scope
from fvb_core.webhook_signing import InvalidSignature, new_secret, verify_signature
from fvb_tools.localstack.ports import free_port
from fvb_tools.localstack.postgres import create_database
from scheduler.api.app import create_app
from scheduler.process import run_scheduler
from scheduler.webhooks import run_pass

from .api_fixtures import T2V, assert_error

pytestmark = pytest.mark.timeout(90)

PUBLIC = "93.184.216.34"


@pytest.fixture(scope="module")
def settings(settings):
    """The API tests' settings with the loopback receivers allowed and short timeouts."""
    return settings.model_copy(
        update=dict(
            webhook_allow_hosts=("127.0.0.1",),
            webhook_timeout_s=0.5,
            webhook_backoff_base_s=5.0,
            webhook_backoff_max_s=60.0,
        )
    )


@pytest.fixture
def tenant(settings):
    """A tenant of its own (its webhooks get only this test's events); every webhook and
    event is gone afterwards, so no later pass delivers this test's leftovers."""
    name = f"t{uuid.uuid4().hex[:10]}"
    with session_scope(settings.database_url) as session:
        key = create_api_key(session, name)
    yield name, {"Authorization": f"Bearer {key}"}
    with session_scope(settings.database_url) as session:
        session.execute(delete(WebhookEvent))
        session.execute(delete(Webhook))


class Receiver:
    """Records every POST (headers lower-cased, raw body); ``answer(n)`` for the n-th one
    gives the status, or (status, headers)."""

    def __init__(self, answer=lambda n: 200, port: int = 0) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.answer = answer
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with lock:
                    outer.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    n = len(outer.requests)
                reply = outer.answer(n)
                status, extra = reply if isinstance(reply, tuple) else (reply, {})
                self.send_response(status)
                for name, value in {**extra, "content-length": "0"}.items():
                    self.send_header(name, value)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def register(client, headers, url, **body):
    response = client.post("/v1/webhooks", json={"url": url, **body}, headers=headers)
    assert response.status_code == 200, response.text
    hook = response.json()
    assert hook["secret"].startswith("whsec_") and hook["url"] == url
    return hook


def finish(url: str, job_id: str, outcome: str) -> None:
    """Play the worker: claim the job, then succeed or fail it."""
    with session_scope(url) as session:
        attempt = transitions.claim(session, job_id, "test-worker").attempt
    with session_scope(url) as session:
        if outcome == "succeed":
            assert transitions.succeed(session, job_id, attempt, f"v/{job_id}.mp4", 9, "0" * 64)
        else:
            assert transitions.fail(session, job_id, attempt, "invalid_prompt", "refused")


def video(client, headers) -> str:
    response = client.post("/v1/videos", json={"model": T2V, "prompt": "p"}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["id"]


def outbox_rows(url: str, webhook_id: str) -> dict[str, WebhookEvent]:
    with session_scope(url) as session:
        rows = session.execute(select(WebhookEvent).where(WebhookEvent.webhook_id == webhook_id))
        return {row.id: row for row in rows.scalars()}


def next_due(url: str):
    with session_scope(url) as session:
        return session.execute(
            select(func.min(WebhookEvent.next_attempt_at)).where(
                WebhookEvent.delivered_at.is_(None), WebhookEvent.given_up_at.is_(None)
            )
        ).scalar()


def drain(settings, now, until=None, passes=80):
    """``run_pass`` at ``now``, then at each next due time, until nothing is due (or the
    next due time is past ``until``). Returns the clock and [(pass time, result)]."""
    results = []
    for _ in range(passes):
        results.append((now, run_pass(settings, now=now)))
        due = next_due(settings.database_url)
        if due is None or (until is not None and due > until):
            return now, results
        now = max(now, due)
    raise AssertionError(f"events still due after {passes} passes")


def verified(secret: str, requests) -> dict[str, dict]:
    """Every delivery's signature checked; the events by id, checking a retry resends the
    same body under the same id."""
    events: dict[str, dict] = {}
    for headers, body in requests:
        event = verify_signature(secret, headers, body)
        assert event["id"] == headers["webhook-id"]
        assert events.setdefault(event["id"], event) == event
    return events


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# -- at least once, de-duplicated by id, signed --------------------------------------------


def delivery_counts(url: str) -> dict[str, int]:
    with session_scope(url) as session:
        return outbox.delivery_counts(session)


def test_refusing_receiver_gets_every_event_once_by_id_signed(client, settings, tenant):
    _, headers = tenant
    refusals = 3
    before = delivery_counts(settings.database_url)
    with Receiver(lambda n: 503 if n <= refusals else 200) as r:
        hook = register(client, headers, r.url)
        listed = client.get("/v1/webhooks", headers=headers).json()["data"]
        assert [(h["id"], h["secret"]) for h in listed] == [(hook["id"], None)]
        body = {"requests": [{"model": T2V, "prompt": f"p{i}"} for i in range(4)]}
        batch = client.post("/v1/batches", json=body, headers=headers).json()
        jobs = client.get(f"/v1/videos?batch_id={batch['id']}&order=asc", headers=headers)
        ok1, ok2, bad, cancelled = [v["id"] for v in jobs.json()["data"]]
        assert client.post(f"/v1/videos/{cancelled}/cancel", headers=headers).status_code == 200
        for job_id, outcome in ((ok1, "succeed"), (bad, "fail"), (ok2, "succeed")):
            finish(settings.database_url, job_id, outcome)
        rows = outbox_rows(settings.database_url, hook["id"])
        assert len(rows) == 5 and not r.requests  # queued by the transitions, not sent yet
        now, results = drain(settings, utcnow())
    assert len(results) > refusals and sum(len(res.failed) for _, res in results) >= refusals
    assert now - results[0][0] >= timedelta(seconds=5 + 10 + 20)  # backoff 5, 10, 20 s
    events = verified(hook["secret"], r.requests)
    assert set(events) == set(rows)  # de-duplicated by id: exactly the outbox's events
    got = {
        (e["type"], e["data"]["id"], (e["data"].get("error") or {}).get("code"))
        for e in events.values()
    }
    assert got == {
        ("video.completed", ok1, None),
        ("video.completed", ok2, None),
        ("video.failed", bad, "invalid_prompt"),
        ("video.failed", cancelled, "cancelled"),
        ("batch.completed", batch["id"], None),
    }
    (done,) = [e for e in events.values() if e["type"] == "batch.completed"]
    counts = done["data"]["request_counts"]
    assert (counts["completed"], counts["failed"], counts["cancelled"]) == (2, 1, 1)
    # Duplicates only as retries under the same id, as many as the table counted.
    rows = outbox_rows(settings.database_url, hook["id"])
    sent = [h["webhook-id"] for h, _ in r.requests]
    assert {i: sent.count(i) for i in rows} == {i: row.attempts for i, row in rows.items()}
    assert len(sent) == 5 + refusals and max(row.attempts for row in rows.values()) > 1
    assert all(row.delivered_at and not row.given_up_at for row in rows.values())
    after = delivery_counts(settings.database_url)  # what /metrics exports
    assert after.get("delivered", 0) - before.get("delivered", 0) == 5
    assert after.get("failed", 0) - before.get("failed", 0) == refusals
    # The check can fail: another secret, or a changed body, does not verify.
    h, body = r.requests[-1]
    with pytest.raises(InvalidSignature):
        verify_signature(new_secret(), h, body)
    with pytest.raises(InvalidSignature):
        verify_signature(hook["secret"], h, body.replace(b'"id"', b'"Id"'))


def test_receiver_down_ten_minutes_still_gets_everything_given_up_only_after_max_age(
    client, settings, tenant
):
    _, headers = tenant
    settings = settings.model_copy(update={"webhook_max_age_s": 1200.0})
    port = free_port()  # nothing listens: connection refused
    hook = register(client, headers, f"http://127.0.0.1:{port}/hook")
    for outcome in ("succeed", "fail"):
        finish(settings.database_url, video(client, headers), outcome)
    start = utcnow()
    now, results = drain(settings, start, until=start + timedelta(seconds=660))
    assert now - start > timedelta(seconds=600)
    assert all(not res.delivered and not res.given_up for _, res in results)
    rows = outbox_rows(settings.database_url, hook["id"])
    # One attempt per pass (the second event waits with the first), passes as the backoff
    # spaces them: 0, 5, 15, 35, 75, 135, then every 60 s: at most 14 by 660 s.
    assert sum(row.attempts for row in rows.values()) == len(results) <= 14
    assert all("connect" in row.last_error for row in rows.values() if row.attempts)
    with Receiver(port=port) as r:
        drain(settings, next_due(settings.database_url))
    assert set(verified(hook["secret"], r.requests)) == set(rows)
    assert all(row.delivered_at for row in outbox_rows(settings.database_url, hook["id"]).values())

    # Down for longer than webhook_max_age_s: given up at the first pass past it, not before.
    late = video(client, headers)
    finish(settings.database_url, late, "succeed")
    (event,) = [
        e for e in outbox_rows(settings.database_url, hook["id"]).values() if not e.delivered_at
    ]
    _, results = drain(settings, utcnow())
    for at, res in results:
        assert bool(res.given_up) == (at - event.created_at >= timedelta(seconds=1200)), at
    assert results[-1][1].given_up == [event.id]
    assert outbox_rows(settings.database_url, hook["id"])[event.id].given_up_at is not None


# -- where webhooks may go ------------------------------------------------------------------


def test_urls_to_internal_addresses_are_refused_at_registration_unless_allowed(
    settings, tenant, monkeypatch
):
    _, headers = tenant
    strict = TestClient(create_app(settings.model_copy(update={"webhook_allow_hosts": ()})))
    monkeypatch.setattr(webhook_urls, "resolve", lambda host, port: ["10.1.2.3"])
    cases = {
        "http://127.0.0.1/": "loopback",
        "http://10.0.0.1/": "private",
        "http://169.254.169.254/latest/meta-data": "link-local",
        "http://[::1]/": "loopback",
        "http://internal.example/": "resolves to 10.1.2.3",
    }
    for url, rule in cases.items():
        response = strict.post("/v1/webhooks", json={"url": url}, headers=headers)
        assert_error(response, 400, "url", "url:", rule)
    allow = ("127.0.0.1", "10.0.0.0/8", "169.254.169.254", "::1", "internal.example")
    lenient = TestClient(create_app(settings.model_copy(update={"webhook_allow_hosts": allow})))
    ids = [register(lenient, headers, url)["id"] for url in cases]
    for webhook_id in ids:
        gone = lenient.delete(f"/v1/webhooks/{webhook_id}", headers=headers).json()
        assert gone == {"id": webhook_id, "object": "webhook.deleted", "deleted": True}
    assert lenient.get("/v1/webhooks", headers=headers).json()["data"] == []


def test_a_host_that_later_resolves_to_an_internal_address_is_not_contacted(
    settings, tenant, monkeypatch
):
    _, headers = tenant
    strict = settings.model_copy(update={"webhook_allow_hosts": ()})
    answers = {"hooks.example": [PUBLIC]}
    monkeypatch.setattr(webhook_urls, "resolve", lambda host, port: answers[host])
    with Receiver() as r:
        url = f"http://hooks.example:{r.port}/hook"
        api = TestClient(create_app(strict))
        hook = register(api, headers, url)
        finish(settings.database_url, video(api, headers), "succeed")
        (event_id,) = outbox_rows(settings.database_url, hook["id"])
        now = utcnow()
        for attempt, addresses in enumerate([["127.0.0.1"], [PUBLIC, "10.0.0.7"]], 1):
            answers["hooks.example"] = addresses  # the DNS answer changed since registration
            assert run_pass(strict, now=now).failed == [event_id]
            row = outbox_rows(settings.database_url, hook["id"])[event_id]
            assert row.attempts == attempt and not row.delivered_at
            assert (
                row.last_error.startswith("refused at delivery") and addresses[-1] in row.last_error
            )
            now = next_due(settings.database_url)
        assert r.requests == []
        # Control: where the allow-list names the address, the same event goes, to the
        # checked address, with Host naming the host.
        answers["hooks.example"] = ["127.0.0.1"]
        assert run_pass(settings, now=now).delivered == [event_id]
    assert [h["host"] for h, _ in r.requests] == [f"hooks.example:{r.port}"]


def test_a_redirect_is_not_followed(client, settings, tenant):
    _, headers = tenant
    with Receiver() as target, Receiver(lambda n: (302, {"location": target.url})) as r:
        hook = register(client, headers, r.url)
        finish(settings.database_url, video(client, headers), "succeed")
        (event_id,) = outbox_rows(settings.database_url, hook["id"])
        assert run_pass(settings, now=utcnow()).failed == [event_id]
    row = outbox_rows(settings.database_url, hook["id"])[event_id]
    assert not row.delivered_at and row.attempts == 1 and "redirect" in row.last_error
    assert len(r.requests) == 1 and target.requests == []


@pytest.mark.parametrize("behaviour", ["silent", "dripping"])
def test_a_receiver_that_never_answers_is_cut_off_after_the_timeout(
    client, settings, tenant, behaviour
):
    _, headers = tenant
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    done = threading.Event()

    def serve() -> None:  # takes the request; answers nothing, or one byte every 0.1 s
        conn, _ = listener.accept()
        conn.recv(65536)
        if behaviour == "dripping":
            for byte in b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n":
                if done.wait(0.1):
                    break
                with suppress(OSError):
                    conn.sendall(bytes([byte]))
        done.wait(30)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        hook = register(client, headers, f"http://127.0.0.1:{port}/hook")
        finish(settings.database_url, video(client, headers), "succeed")
        started = time.monotonic()
        result = run_pass(settings, now=utcnow())
        elapsed = time.monotonic() - started
    finally:
        done.set()
        listener.close()
    assert len(result.failed) == 1 and not result.delivered
    assert 0.4 < elapsed < 0.5 + 1.0, elapsed  # webhook_timeout_s is 0.5
    (row,) = outbox_rows(settings.database_url, hook["id"]).values()
    assert row.attempts == 1 and not row.delivered_at and "no answer" in row.last_error


# -- exactly one event per fact, one delivery per event ----------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_events_are_queued_once_and_concurrent_passes_deliver_each_once(
    request, tmp_path, settings, backend
):
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'fvb.db'}"
    else:
        server = request.getfixturevalue("postgres_server").url
        url = create_database(server, f"wh_{uuid.uuid4().hex[:12]}")
    upgrade(url)
    local = settings.model_copy(update={"database_url": url})
    with Receiver(lambda n: (time.sleep(0.01), 200)[1]) as r:
        with session_scope(url) as session:
            session.add(Batch(id="batch_w", tenant="w"))
            session.add(Webhook(id="wh_w", tenant="w", url=r.url, secret=new_secret()))
            jobs = [Job(tenant="w", model="m", params={}, batch_id="batch_w") for _ in range(12)]
            ids = [job.id for job in transitions.create_jobs(session, jobs)]
        for job_id in ids:
            finish(url, job_id, "succeed")
        with session_scope(url) as session:  # every transition again: nothing new queued
            attempt = session.get(Job, ids[0]).attempt
            assert not transitions.succeed(session, ids[0], attempt, "k", 1, "h")
            assert transitions.request_cancel(session, ids[0]) == "succeeded"
            outbox.job_finished(session, [(job_id, "w") for job_id in ids])
        rows = outbox_rows(url, "wh_w")
        assert sorted(row.type for row in rows.values()) == ["batch.completed"] + [
            "video.completed"
        ] * len(ids)

        now, start = utcnow(), threading.Barrier(4)
        taken: list[int] = []

        def passes() -> None:
            start.wait()
            while (result := run_pass(local, now=now, limit=3)).taken:
                taken.append(result.taken)

        threads = [threading.Thread(target=passes) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    sent = [h["webhook-id"] for h, _ in r.requests]
    assert sorted(sent) == sorted(rows) and sum(taken) == len(rows)
    assert all(row.attempts == 1 and row.delivered_at for row in outbox_rows(url, "wh_w").values())


def test_the_scheduler_process_delivers_in_its_webhook_thread(client, settings, tenant):
    _, headers = tenant
    fast = settings.model_copy(update={"webhook_poll_s": 0.05, "release_interval_s": 0.1})
    with Receiver() as r:
        hook = register(client, headers, r.url)
        stop = threading.Event()
        loop = threading.Thread(target=run_scheduler, args=(fast, stop), daemon=True)
        loop.start()
        try:
            finish(settings.database_url, video(client, headers), "succeed")
            wait_for(lambda: r.requests, 15, "the webhook thread's delivery")
        finally:
            stop.set()
            loop.join(15)
    assert not loop.is_alive()
    (event,) = verified(hook["secret"], r.requests).values()
    assert event["type"] == "video.completed"
