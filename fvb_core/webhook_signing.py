"""Webhook signatures, the standard-webhooks scheme (https://www.standardwebhooks.com).

Every delivery carries three headers:

- ``webhook-id``: the event id (``msg_...``), the same on every retry: de-duplicate by it;
- ``webhook-timestamp``: Unix seconds of this attempt;
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256>`` over ``f"{id}.{timestamp}.{body}"``,
  keyed with the base64-decoded part of the secret after ``whsec_``.

A receiver checks the signature over the raw body it received (before parsing it) and that
the timestamp is recent (:func:`verify_signature` does both), so a captured delivery cannot
be replayed later. Any standard-webhooks library verifies these too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from typing import Any

SECRET_PREFIX = "whsec_"
#: How far a delivery's timestamp may be from the receiver's clock (standard-webhooks' 5 min).
DEFAULT_TOLERANCE_S = 300


class InvalidSignature(ValueError):
    """The delivery is not signed with this secret, or its timestamp is too old or new."""


def new_secret() -> str:
    """``whsec_`` + base64 of 24 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def _as_bytes(body: bytes | str) -> bytes:
    return body.encode() if isinstance(body, str) else body


def sign(secret: str, event_id: str, timestamp: int, body: bytes | str) -> str:
    """The ``webhook-signature`` header value: ``v1,<base64 HMAC-SHA256>``."""
    content = f"{event_id}.{timestamp}.".encode() + _as_bytes(body)
    digest = hmac.new(_key(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str, event_id: str, body: bytes, timestamp: int | None = None):
    """The three standard-webhooks headers of one delivery attempt."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, event_id, timestamp, body),
    }


def verify_signature(
    secret: str,
    headers: Mapping[str, str],
    body: bytes | str,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> dict[str, Any]:
    """The delivered event (the parsed body) if ``headers`` sign ``body`` with ``secret``
    and the timestamp is within ``tolerance_s`` of ``now``; else :class:`InvalidSignature`.

    ``headers`` may be any mapping (names are matched case-insensitively); ``body`` must be
    the raw bytes received. The signature header may list several space-separated
    signatures (secret rotation): one match is enough."""
    lowered = {str(k).lower(): v for k, v in headers.items()}
    event_id = lowered.get("webhook-id")
    stamp = lowered.get("webhook-timestamp")
    given = lowered.get("webhook-signature")
    if not event_id or not stamp or not given:
        raise InvalidSignature("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise InvalidSignature(f"webhook-timestamp {stamp!r} is not Unix seconds") from None
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance_s:
        raise InvalidSignature(f"webhook-timestamp {timestamp} is more than {tolerance_s}s off")
    expected = sign(secret, event_id, timestamp, body).encode()
    if not any(
        hmac.compare_digest(expected, candidate.encode())
        for candidate in given.split()
        if candidate.startswith("v1,")
    ):
        raise InvalidSignature("no v1 signature matches")
    return json.loads(_as_bytes(body))
