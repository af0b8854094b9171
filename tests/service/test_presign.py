"""Our SigV4 presigner (``fvb_core/presign.py``): the very URLs botocore's ``s3v4`` signer
makes for path-style addressing (same clock, region, endpoint, key and expiry), and against
the session's real SeaweedFS S3 server a URL from ``VideoStore`` downloads the object, while
an expired or tampered one is refused.

The clocks are frozen by monkeypatching: botocore reads ``botocore.auth.get_current_datetime``
(botocore 1.3x+; older ones called ``datetime.datetime.utcnow`` through ``botocore.auth``),
the presigner reads ``fvb_core.presign.datetime.now``.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import boto3
import botocore.auth
import pytest
from botocore.config import Config

from fvb_core import presign
from fvb_core.presign import Presigner
from fvb_core.settings import Settings
from fvb_core.storage import VideoStore

pytestmark = pytest.mark.timeout(60)

ACCESS, SECRET = "AKIA/TEST+KEY", "s3cr3t/with+odd=chars"
BUCKET = "fvb-presign-tests"
#: Just before midnight on a leap day: the date stamp of the scope and the signature agree.
FIXED = datetime(2024, 2, 29, 23, 59, 58, tzinfo=UTC)

KEYS = [
    "videos/job_1/attempt-1.mp4",
    "a folder/with spaces.mp4",
    "ünïcødé/vidéo 🎥.mp4",
    "deep/ly/nested//double-slash/",
    "reserved+chars=&?#%20.mp4",
    "~tilde/!*'()[];:@,$.mp4",
    "/leading-slash",
]
ENDPOINTS = [
    "http://127.0.0.1:8333",
    "https://s3.example.com",
    "http://minio.internal:80",  # default ports are not in the signed host
    "https://s3.example.com:443",
    "http://gateway:9000/s3-prefix/",  # an endpoint with a path
]


@pytest.fixture
def frozen_botocore(monkeypatch) -> None:
    assert hasattr(botocore.auth, "get_current_datetime"), "botocore moved its clock again"
    monkeypatch.setattr(
        botocore.auth, "get_current_datetime", lambda remove_tzinfo=True: FIXED.replace(tzinfo=None)
    )


def botocore_url(endpoint: str, region: str, key: str, expires: int) -> str:
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS,
        aws_secret_access_key=SECRET,
        region_name=region,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    return client.generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=expires
    )


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("region", ["us-east-1", "eu-central-1"])
def test_urls_are_byte_identical_to_botocore_s3v4(frozen_botocore, endpoint, region):
    ours = Presigner(endpoint, BUCKET, ACCESS, SECRET, region)
    compared = 0
    for key in KEYS:
        for expires in (1, 900, 3600, 7 * 86400):
            assert ours.url(key, expires, now=FIXED) == botocore_url(endpoint, region, key, expires)
            compared += 1
    assert compared == len(KEYS) * 4


def test_the_default_clock_is_read_at_each_url_and_the_day_key_follows_it(
    frozen_botocore, monkeypatch
):
    """Without ``now`` the presigner reads its clock; across midnight it derives the next
    day's signing key (the cached one would sign a wrong scope)."""
    clock = {"now": FIXED}

    class Clock(datetime):
        @classmethod
        def now(cls, tz=None):
            return clock["now"].astimezone(tz)

    monkeypatch.setattr(presign, "datetime", Clock)
    ours = Presigner(ENDPOINTS[0], BUCKET, ACCESS, SECRET, "us-east-1")
    key = KEYS[1]
    assert ours.url(key, 60) == botocore_url(ENDPOINTS[0], "us-east-1", key, 60)
    after_midnight = FIXED + timedelta(seconds=5)
    clock["now"] = after_midnight
    monkeypatch.setattr(
        botocore.auth,
        "get_current_datetime",
        lambda remove_tzinfo=True: after_midnight.replace(tzinfo=None),
    )
    url = ours.url(key, 60)
    assert "X-Amz-Date=20240301T000003Z" in url and "%2F20240301%2F" in url
    assert url == botocore_url(ENDPOINTS[0], "us-east-1", key, 60)


def test_out_of_range_expiries_and_endpoints_are_refused():
    ours = Presigner(ENDPOINTS[0], BUCKET, ACCESS, SECRET, "us-east-1")
    for expires in (0, -1, 7 * 86400 + 1):
        with pytest.raises(ValueError, match="1 s to 7 days"):
            ours.url("k", expires)
    for endpoint in ("s3.example.com", "ftp://s3.example.com", "http://"):
        with pytest.raises(ValueError, match="not an http"):
            Presigner(endpoint, BUCKET, ACCESS, SECRET, "us-east-1")


# --- against the real store ----------------------------------------------------------------


@pytest.fixture(scope="module")
def store(s3_server) -> VideoStore:
    settings = Settings(
        s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
        s3_region=s3_server.region,
        s3_bucket=BUCKET,
    )
    store = VideoStore(settings)
    store.ensure_bucket()
    return store


def expiring(store: VideoStore, seconds: int) -> VideoStore:
    return VideoStore(store.settings.model_copy(update={"presign_expiry_s": seconds}))


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


STORED = {
    "videos/job_presign/attempt-1.mp4": b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 64,
    "videos/a folder/ünï 🎥 (1).mp4": b"spaces and unicode in the key",
}


@pytest.fixture(scope="module")
def stored(store) -> dict[str, bytes]:
    for key, data in STORED.items():
        store.put_bytes(key, data, "video/mp4")
    return STORED


def test_store_uses_our_presigner_and_its_urls_download_the_objects(store, stored):
    assert store._presigner is not None  # credentials are set: not botocore's signer
    for key, data in stored.items():
        url = store.presigned_get_url(key)
        assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["3600"]
        assert fetch(url) == (200, data)
    # Another key's URL does not fetch this one: the path is part of what is signed.
    url = store.presigned_get_url("videos/job_presign/attempt-1.mp4")
    assert fetch(url.replace("attempt-1.mp4", "attempt-2.mp4"))[0] == 403


def test_an_expired_url_is_refused(store, stored, monkeypatch):
    key = next(iter(stored))
    # Signed ten seconds ago for one second: expired, while a long-lived one signed at the
    # same moment still works (the refusal is the expiry, not the past date).
    past = datetime.now(UTC) - timedelta(seconds=10)

    class Past(datetime):
        @classmethod
        def now(cls, tz=None):
            return past.astimezone(tz)

    monkeypatch.setattr(presign, "datetime", Past)
    expired = expiring(store, 1).presigned_get_url(key)
    alive = expiring(store, 3600).presigned_get_url(key)
    monkeypatch.undo()
    status, body = fetch(expired)
    assert status == 403 and b"xpire" in body, body
    assert fetch(alive) == (200, stored[key])


def test_a_url_stops_working_once_its_second_is_up(store, stored):
    key = next(iter(stored))
    url = expiring(store, 1).presigned_get_url(key)
    signed = datetime.strptime(parse_qs(urlsplit(url).query)["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ")
    deadline = signed.replace(tzinfo=UTC).timestamp() + 15
    assert fetch(url) == (200, stored[key])
    # Poll on the store's answer (not a fixed sleep): it must turn to 403 soon after expiry.
    while (status := fetch(url)[0]) == 200:
        assert time.time() < deadline, "the one-second URL still works long after its expiry"
        time.sleep(0.05)
    assert status == 403
    assert time.time() >= signed.replace(tzinfo=UTC).timestamp() + 1


def test_tampered_urls_are_refused(store, stored):
    key = next(iter(stored))
    url = store.presigned_get_url(key)
    signature = parse_qs(urlsplit(url).query)["X-Amz-Signature"][0]
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    assert fetch(url.replace(signature, flipped))[0] == 403
    # A longer life or another signer's key under the same signature: refused too.
    assert fetch(url.replace("X-Amz-Expires=3600", "X-Amz-Expires=7200"))[0] == 403
    wrong_secret = Presigner(
        store.settings.s3_endpoint_url, BUCKET, store.settings.s3_access_key, "not-it", "us-east-1"
    )
    assert fetch(wrong_secret.url(key, 60))[0] == 403
    assert fetch(url) == (200, stored[key])
