"""Video storage on any S3-compatible endpoint (SeaweedFS locally, MinIO or AWS in production).

Keys: ``videos/<job_id>/attempt-<n>.mp4``, a JSON sidecar ``.../attempt-<n>.json`` with the
job's parameters, and two previews made by the worker beside the mp4: the first frame
(``.../attempt-<n>.thumbnail.webp``) and a grid of frames (``.../attempt-<n>.spritesheet.jpg``),
served as the ``thumbnail`` and ``spritesheet`` variants of ``GET /v1/videos/{id}/content``.
One key per attempt, so a stale attempt never overwrites the winner.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from fvb_core.presign import Presigner
from fvb_core.settings import Settings


class StorageUnavailable(RuntimeError):
    """The store could not be reached or refused the request; worth retrying later."""


class ObjectMissing(LookupError):
    """The store answered: no object under that key (retrying will not help)."""


#: botocore's ways of saying "no such object" (GetObject, HeadObject).
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


def input_image_key(job_id: str) -> str:
    """The image-to-video input of a job, an RGB PNG stored by the API."""
    return f"inputs/{job_id}/image.png"


def job_prefixes(job_id: str) -> tuple[str, ...]:
    """Every prefix a job's objects live under (its attempts, its input)."""
    return (f"videos/{job_id}/", f"inputs/{job_id}/")


def video_key(job_id: str, attempt: int) -> str:
    return f"videos/{job_id}/attempt-{attempt}.mp4"


def sidecar_key(job_id: str, attempt: int) -> str:
    return f"videos/{job_id}/attempt-{attempt}.json"


def thumbnail_key(job_id: str, attempt: int) -> str:
    return f"videos/{job_id}/attempt-{attempt}.thumbnail.webp"


def spritesheet_key(job_id: str, attempt: int) -> str:
    return f"videos/{job_id}/attempt-{attempt}.spritesheet.jpg"


def attempt_keys(job_id: str, attempt: int) -> tuple[str, ...]:
    """Every key attempt ``attempt`` of the job writes: video, previews, sidecar."""
    return (
        video_key(job_id, attempt),
        thumbnail_key(job_id, attempt),
        spritesheet_key(job_id, attempt),
        sidecar_key(job_id, attempt),
    )


_ATTEMPT_OF_KEY = re.compile(r"/attempt-(\d+)\.[^/]*$")


def earlier_attempt_keys(keys: list[str], job_id: str, attempt: int) -> list[str]:
    """The keys among ``keys`` that belong to attempts of the job before ``attempt``."""
    prefix = f"videos/{job_id}/"
    earlier = []
    for key in keys:
        match = _ATTEMPT_OF_KEY.search(key)
        if key.startswith(prefix) and match and int(match.group(1)) < attempt:
            earlier.append(key)
    return sorted(earlier)


#: ``videos/<job>/...`` and ``inputs/<job>/...``: the job a key belongs to.
_JOB_OF_KEY = re.compile(r"^(?:videos|inputs)/([^/]+)/[^/]+$")


@dataclass(frozen=True)
class KeyOwner:
    job_id: str
    #: The attempt that wrote it (``attempt-<n>.*`` under ``videos/``); None for the input
    #: image and any other name.
    attempt: int | None


def key_owner(key: str) -> KeyOwner | None:
    """The job (and attempt) a key belongs to, by the rules above; None for other keys."""
    match = _JOB_OF_KEY.match(key)
    if match is None:
        return None
    attempt = _ATTEMPT_OF_KEY.search(key) if key.startswith("videos/") else None
    return KeyOwner(match.group(1), int(attempt.group(1)) if attempt else None)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class StoredObject:
    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ListedObject:
    key: str
    last_modified: datetime


@dataclass(frozen=True)
class UnfinishedUpload:
    """A multipart upload begun and never completed nor aborted (its parts take space)."""

    key: str
    upload_id: str
    initiated: datetime


#: DeleteObjects takes at most this many keys a request.
_DELETE_BATCH = 1000


class VideoStore:
    """The bucket of one deployment. Workers keep the long default read timeout (large
    uploads); the API passes short ones (its calls sit on a request thread)."""

    def __init__(
        self, settings: Settings, *, connect_timeout_s: float = 3, read_timeout_s: float = 30
    ) -> None:
        self.settings = settings
        self.bucket = settings.s3_bucket
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s

    @cached_property
    def client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.settings.s3_endpoint_url,
            aws_access_key_id=self.settings.s3_access_key,
            aws_secret_access_key=self.settings.s3_secret_key,
            region_name=self.settings.s3_region,
            # Our own retry policy (worker) decides how long to wait for a store that is down.
            config=Config(
                retries={"max_attempts": 1, "mode": "standard"},
                connect_timeout=self.connect_timeout_s,
                read_timeout=self.read_timeout_s,
                s3={"addressing_style": "path"},
            ),
        )

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _call(self, what: str, fn, *args, **kwargs):
        """``fn`` with botocore's errors made ours: ObjectMissing for a missing key, else
        StorageUnavailable (here and nowhere else)."""
        try:
            return fn(*args, **kwargs)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in _MISSING_CODES:
                raise ObjectMissing(f"no object {kwargs.get('Key', '')!r} in the store") from err
            raise StorageUnavailable(f"storage {what} failed: {err}") from err
        except BotoCoreError as err:
            raise StorageUnavailable(f"storage {what} failed: {err}") from err

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        self._call(
            "put_object",
            self.client.put_object,
            Bucket=self.bucket,
            Key=key,
            Body=io.BytesIO(data),
            ContentType=content_type,
        )

    def get_bytes(self, key: str) -> bytes:
        """The whole object (small ones: input images); ObjectMissing if there is none."""
        response = self._call("get_object", self.client.get_object, Bucket=self.bucket, Key=key)
        try:
            return response["Body"].read()
        except (BotoCoreError, ClientError) as err:
            raise StorageUnavailable(f"storage read of {key} failed: {err}") from err

    def delete_job(self, job_id: str) -> list[str]:
        """Every object of the job (all attempts, its input); the keys deleted."""
        keys = [key for prefix in job_prefixes(job_id) for key in self.list_keys(prefix)]
        self.delete(*keys)
        return keys

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self._call("create_bucket", self.client.create_bucket, Bucket=self.bucket)
        except BotoCoreError as err:
            raise StorageUnavailable(f"storage head_bucket failed: {err}") from err

    def upload_video(self, path: Path, key: str, sha256: str) -> StoredObject:
        """Upload with multipart above the configured threshold."""
        transfer = TransferConfig(
            multipart_threshold=self.settings.multipart_threshold_bytes,
            multipart_chunksize=max(self.settings.multipart_threshold_bytes, 5 * 1024 * 1024),
        )
        self._call(
            "upload",
            self.client.upload_file,
            str(path),
            self.bucket,
            key,
            ExtraArgs={"ContentType": "video/mp4", "Metadata": {"sha256": sha256}},
            Config=transfer,
        )
        return StoredObject(key=key, size=path.stat().st_size, sha256=sha256)

    def put_json(self, key: str, document: dict[str, Any]) -> None:
        body = json.dumps(document, indent=2, sort_keys=True, default=str).encode()
        self._call(
            "put_object",
            self.client.put_object,
            Bucket=self.bucket,
            Key=key,
            Body=body,
            ContentType="application/json",
        )

    def delete(self, *keys: str) -> None:
        for key in keys:
            self._call("delete_object", self.client.delete_object, Bucket=self.bucket, Key=key)

    def delete_many(self, keys: Iterable[str]) -> int:
        """Delete ``keys`` (a missing one counts as deleted), up to 1000 a request; how many.
        StorageUnavailable if the store refused any of them."""
        keys = sorted(set(keys))
        for start in range(0, len(keys), _DELETE_BATCH):
            chunk = keys[start : start + _DELETE_BATCH]
            answer = self._call(
                "delete_objects",
                self.client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": key} for key in chunk], "Quiet": True},
            )
            refused = answer.get("Errors") or []
            if refused:
                first = refused[0]
                raise StorageUnavailable(
                    f"storage delete_objects refused {len(refused)} key(s), e.g. "
                    f"{first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
                )
        return len(keys)

    def job_keys(self, job_id: str) -> list[str]:
        """Every stored key of the job (all attempts, its input)."""
        return [key for prefix in job_prefixes(job_id) for key in self.list_keys(prefix)]

    def list_page(
        self, prefix: str = "", start_after: str = "", max_keys: int = 1000
    ) -> tuple[list[ListedObject], bool]:
        """One page of the keys under ``prefix`` that sort after ``start_after``, in key
        order, with their age; and whether more follow."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": max_keys}
        if start_after:
            kwargs["StartAfter"] = start_after
        page = self._call("list_objects_v2", self.client.list_objects_v2, **kwargs)
        listed = [ListedObject(o["Key"], o["LastModified"]) for o in page.get("Contents", [])]
        return listed, bool(page.get("IsTruncated")) and bool(listed)

    def unfinished_uploads(self, limit: int = 1000) -> list[UnfinishedUpload]:
        """Up to ``limit`` multipart uploads of the bucket that were never completed."""
        uploads: list[UnfinishedUpload] = []
        markers: dict[str, str] = {}
        while len(uploads) < limit:
            page = self._call(
                "list_multipart_uploads",
                self.client.list_multipart_uploads,
                Bucket=self.bucket,
                MaxUploads=min(1000, limit - len(uploads)),
                **markers,
            )
            uploads += [
                UnfinishedUpload(u["Key"], u["UploadId"], u["Initiated"])
                for u in page.get("Uploads", [])
            ]
            following = {
                "KeyMarker": page.get("NextKeyMarker") or "",
                "UploadIdMarker": page.get("NextUploadIdMarker") or "",
            }
            # Some stores (SeaweedFS) say "truncated" without a key marker: stop there.
            if not page.get("IsTruncated") or not following["KeyMarker"] or following == markers:
                break
            markers = following
        return uploads[:limit]

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort a multipart upload and drop its parts (one already gone is fine)."""
        try:
            self._call(
                "abort_multipart_upload",
                self.client.abort_multipart_upload,
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
            )
        except StorageUnavailable as err:
            code = getattr(err.__cause__, "response", {}).get("Error", {}).get("Code")
            if code != "NoSuchUpload":
                raise

    def list_keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        try:
            return [obj["Key"] for page in pages for obj in page.get("Contents", [])]
        except (BotoCoreError, ClientError) as err:
            raise StorageUnavailable(f"storage list failed: {err}") from err

    def open(
        self, key: str, chunk_size: int = 1 << 20, byte_range: tuple[int, int] | None = None
    ) -> tuple[int | None, Iterator[bytes]]:
        """(size in bytes, chunks) of a stored object, or of its bytes ``byte_range`` (first
        and last, inclusive, within the object); the GET is sent now, so a missing key or a
        store that is down raises here, before any byte is promised to a client."""
        ranged = {"Range": f"bytes={byte_range[0]}-{byte_range[1]}"} if byte_range else {}
        response = self._call(
            "get_object", self.client.get_object, Bucket=self.bucket, Key=key, **ranged
        )

        def chunks() -> Iterator[bytes]:
            try:
                yield from response["Body"].iter_chunks(chunk_size)
            except (BotoCoreError, ClientError) as err:
                raise StorageUnavailable(f"storage read of {key} failed: {err}") from err
            finally:
                response["Body"].close()

        return response.get("ContentLength"), chunks()

    @cached_property
    def _presigner(self) -> Presigner | None:
        s = self.settings
        if not (s.s3_endpoint_url and s.s3_access_key and s.s3_secret_key):
            return None  # credentials from boto3's own chain: let it sign
        return Presigner(
            s.s3_endpoint_url, self.bucket, s.s3_access_key, s.s3_secret_key, s.s3_region
        )

    def presigned_get_url(self, key: str) -> str:
        """A GET URL valid for ``presign_expiry_s`` (SigV4; a few microseconds each)."""
        if self._presigner is not None:
            return self._presigner.url(key, self.settings.presign_expiry_s)
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=self.settings.presign_expiry_s,
        )

    def ping(self) -> None:
        self._call("head_bucket", self.client.head_bucket, Bucket=self.bucket)

    def put_file(self, path: Path, key: str, content_type: str) -> StoredObject:
        """Upload a small file (a preview image) in one PUT; its sha256 goes in the metadata."""
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        self._call(
            "put_object",
            self.client.put_object,
            Bucket=self.bucket,
            Key=key,
            Body=data,
            ContentType=content_type,
            Metadata={"sha256": digest},
        )
        return StoredObject(key=key, size=len(data), sha256=digest)
