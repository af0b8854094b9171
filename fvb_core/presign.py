"""Presigned GET URLs (AWS Signature Version 4, query-string form) without boto3.

A bulk manifest hands out one URL per video: 100,000 of them. botocore takes about 120 us
per URL (it builds a whole request object each time); this takes a few: the signing key is
derived once per day and region, each URL is one HMAC over its canonical request's hash.
The URLs are the ones botocore's ``s3v4`` signer makes for path-style addressing
(``tests/service/test_presign.py`` checks them against botocore and against the store).
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from urllib.parse import quote, urlsplit

_ALGORITHM = "AWS4-HMAC-SHA256"
#: The query string's parameters other than the signature, in canonical (sorted) order.
_UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


class Presigner:
    """Signs GET URLs for objects of one bucket at one path-style endpoint."""

    def __init__(
        self, endpoint_url: str, bucket: str, access_key: str, secret_key: str, region: str
    ) -> None:
        parts = urlsplit(endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"s3_endpoint_url {endpoint_url!r} is not an http(s) URL")
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.host = parts.netloc
        # Default ports are left out of the signed Host header, as HTTP clients send it.
        default = {"http": ":80", "https": ":443"}[parts.scheme]
        if self.host.endswith(default):
            self.host = self.host[: -len(default)]
        self.base_path = parts.path.rstrip("/")
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self._day_key: tuple[str, bytes] | None = None

    def _signing_key(self, day: str) -> bytes:
        if self._day_key is None or self._day_key[0] != day:
            key = _hmac(f"AWS4{self.secret_key}".encode(), day)
            for part in (self.region, "s3", "aws4_request"):
                key = _hmac(key, part)
            self._day_key = (day, key)
        return self._day_key[1]

    def url(self, key: str, expires_s: int, now: datetime | None = None) -> str:
        if not 1 <= expires_s <= 7 * 86400:
            raise ValueError("a presigned URL lives 1 s to 7 days (SigV4's limit)")
        now = (now or datetime.now(UTC)).astimezone(UTC)
        stamp = now.strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        scope = f"{day}/{self.region}/s3/aws4_request"
        path = quote(f"{self.base_path}/{self.bucket}/{key}", safe="/~")
        query = (
            f"X-Amz-Algorithm={_ALGORITHM}"
            f"&X-Amz-Credential={quote(f'{self.access_key}/{scope}', safe='~')}"
            f"&X-Amz-Date={stamp}"
            f"&X-Amz-Expires={expires_s}"
            "&X-Amz-SignedHeaders=host"
        )
        canonical = f"GET\n{path}\n{query}\nhost:{self.host}\n\nhost\n{_UNSIGNED_PAYLOAD}"
        to_sign = (
            f"{_ALGORITHM}\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        )
        signature = hmac.new(self._signing_key(day), to_sign.encode(), hashlib.sha256)
        return f"{self.origin}{path}?{query}&X-Amz-Signature={signature.hexdigest()}"
