"""Webhook delivery: the outbox (``webhook_events``) sent at least once, signed.

Each pass (:func:`run_pass`) takes up to ``limit`` due events (``ix_webhook_events_due``:
undelivered, not given up, ``next_attempt_at`` passed), claims them in one guarded UPDATE
(their ``next_attempt_at`` moved past the pass's own deadline, so another scheduler process
does not send them meanwhile; a process that dies mid-pass leaves them due again later), and
POSTs each to its webhook's URL, the events of different webhooks in parallel:

- the URL is checked again (``fvb_core.webhook_urls``) and the connection goes to the
  address that was checked, with ``Host`` and TLS SNI naming the host (no DNS rebinding);
- no redirect is followed (a 3xx is a failure), short timeouts (``webhook_timeout_s`` to
  connect, and for the whole answer);
- headers ``webhook-id`` (the event id: the same on every retry, receivers de-duplicate by
  it), ``webhook-timestamp``, ``webhook-signature`` (``fvb_core.webhook_signing``).

A 2xx answer marks the event delivered. Anything else counts an attempt and schedules the
next one ``min(webhook_backoff_base_s * 2**(attempts-1), webhook_backoff_max_s)`` later (plus
up to 10% jitter); the webhook's later events in the same pass wait with it (a receiver that
is down costs one attempt per pass, not one per event). An event still failing
``webhook_max_age_s`` after it was written is given up (``given_up_at``).

:func:`run_webhooks` is the loop the scheduler process runs in a thread of its own.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import random
import socket
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from fvb_core.db import outbox
from fvb_core.db.models import Webhook, WebhookEvent, utcnow
from fvb_core.db.session import session_scope
from fvb_core.settings import Settings
from fvb_core.webhook_signing import signed_headers
from fvb_core.webhook_urls import CheckedUrl, UrlRefused, check_url

log = logging.getLogger(__name__)

USER_AGENT = "fvb-webhooks"
#: Events one pass takes; webhooks served at once within it.
PASS_LIMIT = 100
PARALLEL = 8
#: The part of a receiver's answer kept in ``last_error``.
_ERROR_BODY_BYTES = 200


@dataclass(frozen=True)
class Attempt:
    """What one POST came to: ``ok`` for a 2xx; else why (``error``)."""

    ok: bool
    error: str | None = None
    status: int | None = None


@dataclass
class PassResult:
    delivered: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    given_up: list[str] = field(default_factory=list)
    #: Events taken this pass (``limit`` means more may be due already).
    taken: int = 0


# -- one POST ---------------------------------------------------------------------------------


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to ``address`` (checked), with the Host header naming the URL's host."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def _open(self) -> socket.socket:
        return socket.create_connection((self._address, self.port), self.timeout)

    def connect(self) -> None:
        self.sock = self._open()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPS(_PinnedHTTP):
    """HTTPS to ``address``, the certificate checked against the host (SNI names it)."""

    default_port = 443

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, address, timeout)
        self._context = ssl.create_default_context()

    def connect(self) -> None:
        super().connect()
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)


def post(target: CheckedUrl, body: bytes, headers: dict[str, str], timeout_s: float) -> Attempt:
    """POST ``body`` to the checked URL, at its checked address; never follows a redirect.
    The whole exchange is cut off ``timeout_s`` after the connection was made."""
    kind = _PinnedHTTPS if target.scheme == "https" else _PinnedHTTP
    last = "no address"
    for address in target.addresses:
        conn = kind(target.host, target.port, address, timeout_s)
        try:
            conn.connect()
        except OSError as err:
            last = f"connect to {address} port {target.port} failed: {err}"
            conn.close()
            continue
        # Every read waits at most timeout_s; a receiver dripping its answer is cut off too.
        watchdog = threading.Timer(timeout_s, _cut, (conn,))
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.request("POST", target.target, body=body, headers=headers)
            response = conn.getresponse()
            status = response.status
            if 200 <= status < 300:
                return Attempt(True, status=status)
            text = response.read(_ERROR_BODY_BYTES).decode("utf-8", "replace").strip()
            if 300 <= status < 400:
                where = response.getheader("location", "")
                return Attempt(False, f"HTTP {status}: redirect to {where!r} not followed", status)
            return Attempt(False, f"HTTP {status}: {text}" if text else f"HTTP {status}", status)
        except (OSError, http.client.HTTPException) as err:
            return Attempt(False, f"no answer from {address} port {target.port}: {err!r}")
        finally:
            watchdog.cancel()
            conn.close()
    return Attempt(False, last)


def _cut(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def deliver(settings: Settings, url: str, secret: str, event_id: str, body: bytes) -> Attempt:
    """One attempt: the URL checked again, then the signed POST."""
    try:
        target = check_url(url, settings.webhook_allow_hosts)
    except UrlRefused as err:
        return Attempt(False, f"refused at delivery: {err}")
    headers = {
        **signed_headers(secret, event_id, body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "connection": "close",
    }
    return post(target, body, headers, settings.webhook_timeout_s)


# -- the pass ---------------------------------------------------------------------------------


def backoff_s(settings: Settings, attempts: int) -> float:
    """Seconds before the next try after ``attempts`` failed ones (jitter up to 10%)."""
    delay = min(
        settings.webhook_backoff_base_s * 2 ** max(0, attempts - 1), settings.webhook_backoff_max_s
    )
    return delay * (1 + random.uniform(0, 0.1))


def body_of(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def _claim(session, settings: Settings, now: datetime, limit: int) -> list[Any]:
    """Due events with their webhook's URL and secret, claimed for this pass."""
    due = session.execute(
        select(
            WebhookEvent.id,
            WebhookEvent.webhook_id,
            WebhookEvent.payload,
            WebhookEvent.created_at,
            WebhookEvent.attempts,
            Webhook.url,
            Webhook.secret,
        )
        .join(Webhook, Webhook.id == WebhookEvent.webhook_id)
        .where(
            WebhookEvent.delivered_at.is_(None),
            WebhookEvent.given_up_at.is_(None),
            WebhookEvent.next_attempt_at <= now,
        )
        .order_by(WebhookEvent.next_attempt_at)
        .limit(limit)
    ).all()
    if not due:
        return []
    per_hook: dict[str, int] = {}
    for row in due:
        per_hook[row.webhook_id] = per_hook.get(row.webhook_id, 0) + 1
    rounds = -(-len(per_hook) // PARALLEL) * max(per_hook.values())
    # Past the longest this pass can take (each POST: connect + answer timeouts).
    until = now + timedelta(seconds=settings.webhook_timeout_s * (2 * rounds + 1) + 5)
    claimed = set(
        session.execute(
            update(WebhookEvent)
            .where(
                WebhookEvent.id.in_([row.id for row in due]),
                WebhookEvent.delivered_at.is_(None),
                WebhookEvent.given_up_at.is_(None),
                WebhookEvent.next_attempt_at <= now,
            )
            .values(next_attempt_at=until)
            .returning(WebhookEvent.id)
        ).scalars()
    )
    return [row for row in due if row.id in claimed]


def _record(
    settings: Settings,
    event: Any,
    outcome: Attempt | None,
    now: datetime,
    wait_until: datetime | None = None,
) -> str:
    """Write one event's outcome; ``outcome`` None: not tried (an earlier event to the same
    webhook failed this pass). A failed or untried event waits until ``wait_until`` (the
    webhook's next try, one time for all its events). Returns delivered, failed or given_up."""
    values: dict[str, Any]
    if outcome is not None and outcome.ok:
        values = dict(delivered_at=now, attempts=event.attempts + 1, last_error=None)
        kind = "delivered"
    else:
        if outcome is None:
            values = dict(next_attempt_at=wait_until or now)
        else:
            attempts = event.attempts + 1
            values = dict(
                attempts=attempts,
                last_error=(outcome.error or "failed")[:2000],
                next_attempt_at=wait_until
                or now + timedelta(seconds=backoff_s(settings, attempts)),
            )
        kind = "failed"
        if (now - event.created_at).total_seconds() >= settings.webhook_max_age_s:
            values["given_up_at"] = now
            kind = "given_up"
    with session_scope(settings.database_url) as session:
        written = session.execute(
            update(WebhookEvent)
            .where(WebhookEvent.id == event.id, WebhookEvent.delivered_at.is_(None))
            .values(**values)
        ).rowcount
        if written and (outcome is not None or kind == "given_up"):  # an attempt, or the end
            outbox.count_delivery(session, kind)
    return kind


def _serve_webhook(
    settings: Settings, events: list[Any], now: datetime, send: Callable[..., Attempt]
) -> list[tuple[str, str]]:
    """One webhook's events this pass, in order; after a failure the rest wait with it."""
    done: list[tuple[str, str]] = []
    retry_at: datetime | None = None
    for event in events:
        if retry_at is not None:
            done.append((event.id, _record(settings, event, None, now, retry_at)))
            continue
        outcome = send(settings, event.url, event.secret, event.id, body_of(event.payload))
        if not outcome.ok:
            log.info("webhook event %s to %s failed: %s", event.id, event.url, outcome.error)
            # One jittered time for the failed event and those waiting with it: apart, a
            # waiting one could come due first and cost the down receiver another attempt.
            retry_at = now + timedelta(seconds=backoff_s(settings, event.attempts + 1))
        done.append((event.id, _record(settings, event, outcome, now, retry_at)))
    return done


def run_pass(
    settings: Settings,
    now: datetime | None = None,
    limit: int = PASS_LIMIT,
    send: Callable[..., Attempt] = deliver,
) -> PassResult:
    """Deliver what is due at ``now`` (a test passes its own clock); what became of each."""
    now = now or utcnow()
    with session_scope(settings.database_url) as session:
        events = _claim(session, settings, now, limit)
    result = PassResult(taken=len(events))
    if not events:
        return result
    by_hook: dict[str, list[Any]] = {}
    for event in events:
        by_hook.setdefault(event.webhook_id, []).append(event)
    with ThreadPoolExecutor(min(PARALLEL, len(by_hook)), thread_name_prefix="webhook") as pool:
        futures = [
            pool.submit(_serve_webhook, settings, group, now, send) for group in by_hook.values()
        ]
        for future in futures:
            for event_id, kind in future.result():
                getattr(result, kind).append(event_id)
    if result.given_up:
        log.warning("gave up %d webhook event(s) after %.0fs", len(result.given_up),
                    settings.webhook_max_age_s)  # fmt: skip
    return result


def run_webhooks(settings: Settings, stop: threading.Event) -> None:
    """Passes until ``stop``: back to back while full ones come, else every webhook_poll_s."""
    log.info("webhook delivery started: every %.1fs", settings.webhook_poll_s)
    while not stop.is_set():
        taken = 0
        try:
            taken = run_pass(settings).taken
        except Exception:
            log.exception("webhook pass failed; retrying in %.1fs", settings.webhook_poll_s)
        if taken < PASS_LIMIT:
            stop.wait(settings.webhook_poll_s)
    log.info("webhook delivery stopped")


def start_webhooks(settings: Settings, stop: threading.Event) -> threading.Thread:
    """:func:`run_webhooks` in a daemon thread of its own: a slow receiver holds up nothing
    else of the scheduler."""
    thread = threading.Thread(
        target=run_webhooks, args=(settings, stop), name="webhooks", daemon=True
    )
    thread.start()
    return thread
