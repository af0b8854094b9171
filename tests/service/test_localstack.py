"""The local stack starts real servers that work, restart in place and leave nothing behind."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import boto3
import psycopg
import pytest
import redis
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from fvb_tools.localstack import (
    RunningService,
    S3Service,
    start_postgres,
    start_seaweedfs,
    start_valkey,
)

from .conftest import S3_ACCESS_KEY, S3_SECRET_KEY

pytestmark = pytest.mark.timeout(60)


def _gone(service: RunningService) -> bool:
    """True when neither the server nor anything in its process group is left."""
    pid = service.pid
    assert pid is not None
    for probe in (lambda: os.kill(pid, 0), lambda: os.killpg(pid, 0)):
        try:
            probe()
        except ProcessLookupError:
            continue
        return False
    return True


def _port_closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return True
    return False


def _bucket() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def test_valkey_set_get(valkey_server: RunningService) -> None:
    assert valkey_server.url.startswith("redis://127.0.0.1:")
    client = redis.Redis.from_url(valkey_server.url)
    client.set("greeting", "hello")
    assert client.get("greeting") == b"hello"
    client.close()


def test_s3_bucket_object_roundtrip(s3_server: S3Service) -> None:
    assert s3_server.endpoint_url == f"http://127.0.0.1:{s3_server.port}"
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name="us-east-1",
    )
    bucket = _bucket()
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="videos/out.mp4", Body=b"\x00video bytes")
    assert s3.get_object(Bucket=bucket, Key="videos/out.mp4")["Body"].read() == b"\x00video bytes"
    listed = s3.list_objects_v2(Bucket=bucket)["Contents"]
    assert [item["Key"] for item in listed] == ["videos/out.mp4"]
    s3.delete_object(Bucket=bucket, Key="videos/out.mp4")
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    s3.delete_bucket(Bucket=bucket)
    assert bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]]


def test_s3_rejects_a_wrong_secret(s3_server: S3Service) -> None:
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key="not-the-secret",
        region_name="us-east-1",
    )
    with pytest.raises(ClientError) as raised:
        s3.list_buckets()
    assert raised.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


def test_postgres_create_insert_select(postgres_server: RunningService) -> None:
    url = postgres_server.url
    assert url.startswith("postgresql+psycopg://") and url.endswith("/fvb")
    # The SQLAlchemy URL minus its driver suffix is a libpq URI psycopg takes as is.
    with psycopg.connect(url.replace("+psycopg", "", 1)) as conn:
        conn.execute("CREATE TABLE jobs (id serial PRIMARY KEY, prompt text NOT NULL)")
        conn.execute("INSERT INTO jobs (prompt) VALUES (%s), (%s)", ("a cat", "a dog"))
        rows = conn.execute("SELECT id, prompt FROM jobs ORDER BY id").fetchall()
        assert rows == [(1, "a cat"), (2, "a dog")]
        assert conn.execute("SELECT current_database()").fetchone() == ("fvb",)


def test_postgres_never_runs_as_root(postgres_server: RunningService) -> None:
    status = Path(f"/proc/{postgres_server.pid}/status").read_text()
    real_uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
    assert real_uid != 0
    if os.geteuid() != 0:
        assert real_uid == os.geteuid()


def test_seaweedfs_restart_on_same_port_keeps_objects(tmp_path: Path) -> None:
    with start_seaweedfs(tmp_path, S3_ACCESS_KEY, S3_SECRET_KEY) as s3_server:
        fail_fast = {"connect_timeout": 0.5, "read_timeout": 0.5, "retries": {"max_attempts": 0}}
        s3 = s3_server.client(**fail_fast)
        s3.create_bucket(Bucket="outputs")
        s3.put_object(Bucket="outputs", Key="job-1.mp4", Body=b"frames")
        port, pid = s3_server.port, s3_server.pid

        s3_server.stop()
        assert _gone(s3_server) and _port_closed(port)
        with pytest.raises(EndpointConnectionError):  # S3 is down: the upload fails
            s3.put_object(Bucket="outputs", Key="job-2.mp4", Body=b"more frames")

        s3_server.restart()
        assert s3_server.port == port and s3_server.pid != pid
        # Checks that expect an answer get ordinary timeouts: on a loaded 2-core machine a
        # fresh or just-resumed server can take longer than the fail-fast 0.5 s to reply.
        patient = s3_server.client()
        assert patient.get_object(Bucket="outputs", Key="job-1.mp4")["Body"].read() == b"frames"
        patient.put_object(Bucket="outputs", Key="job-2.mp4", Body=b"more frames")

        # Paused, the port stays open but nothing answers; resumed, it carries on.
        s3_server.pause()
        try:
            with pytest.raises((ReadTimeoutError, ConnectTimeoutError)):
                s3.head_object(Bucket="outputs", Key="job-1.mp4")
        finally:
            s3_server.resume()
        assert patient.head_object(Bucket="outputs", Key="job-2.mp4")["ContentLength"] == 11
    assert _gone(s3_server) and _port_closed(port)


def test_valkey_restart_keeps_keys_and_stop_leaves_nothing(tmp_path: Path) -> None:
    with start_valkey(tmp_path) as valkey:
        client = redis.Redis.from_url(valkey.url)
        client.set("queued", "job-1")
        port = valkey.port
        valkey.restart()
        assert valkey.port == port
        assert client.get("queued") == b"job-1"  # redis-py reconnects on its own
        client.close()
    assert _gone(valkey) and _port_closed(port)


def test_stop_is_idempotent_and_leaves_no_process(tmp_path: Path) -> None:
    # Postgres forks a process per backend and helper; all must go with the postmaster.
    service = start_postgres(tmp_path)
    conn = psycopg.connect(service.url.replace("+psycopg", "", 1))
    conn.execute("SELECT 1")
    port = service.port
    service.stop()  # fast shutdown: an open client connection does not hold it up
    conn.close()
    service.stop()
    assert _gone(service) and _port_closed(port)


def test_s3_client_helper(s3_server: S3Service) -> None:
    s3 = s3_server.client(retries={"max_attempts": 1})
    assert isinstance(s3.list_buckets()["Buckets"], list)


def test_postgres_pause_freezes_open_connections_too(tmp_path: Path) -> None:
    """Its backends lead sessions of their own: the group signal alone missed them."""
    import threading

    with start_postgres(tmp_path / "pg") as server:
        url = server.url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(url, connect_timeout=5) as connection:
            connection.execute("SELECT 1")
            server.pause()
            answered = threading.Event()

            def query() -> None:
                connection.execute("SELECT 1")
                answered.set()

            worker = threading.Thread(target=query, daemon=True)
            try:
                worker.start()
                assert not answered.wait(1.0), "a paused server answered"
            finally:
                server.resume()
            assert answered.wait(10)
