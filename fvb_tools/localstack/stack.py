"""``fvb up``: the whole service on one machine, from PyPI packages, on loopback.

Valkey, SeaweedFS S3 and the database (an SQLite file, or embedded PostgreSQL), then our
API, scheduler and one worker as child processes, all configured through FVB_* variables
exactly as in production. With no models config, a tiny random-weight Wan2.1 model is built.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from fvb_tools.localstack.data_dir import DataDirLock, write_env
from fvb_tools.localstack.ports import HOST, free_port
from fvb_tools.localstack.process import ManagedProcess, ServiceStartError, stop_together
from fvb_tools.localstack.seaweed import start_seaweedfs
from fvb_tools.localstack.services import RunningService
from fvb_tools.localstack.valkey import start_valkey

DEV_TENANT = "dev"


class PortInUse(ValueError):
    """The API port the caller asked for is taken."""


def port_is_free(port: int) -> bool:
    """Whether the API could bind 127.0.0.1:``port`` now (as uvicorn does, SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


@dataclass
class StackInfo:
    api_url: str
    dev_key: str
    dashboard_url: str
    broker_url: str
    s3_endpoint_url: str
    database_url: str
    env: dict[str, str]
    data_dir: Path
    models_config: Path
    #: Set when the API could not take the default port (what to tell the user).
    api_port_note: str | None = None
    #: ``stack.env`` in the data dir, which the other ``fvb`` commands read.
    env_file: Path | None = None


def _demo_models_config(data_dir: Path) -> Path:
    """Build the tiny random-weight models (once) and a models config naming them."""
    from diffusers.utils import logging as diffusers_logging

    from fastvideo.testing.tiny_wan import TinyWanConfig, save_tiny_wan
    from fvb_core.models_config import write_models_config

    diffusers_logging.disable_progress_bar()  # tiny files: the bars would only be noise

    models = {}
    for name, i2v in (("tiny-wan-t2v", False), ("tiny-wan-i2v", True)):
        folder = data_dir / "models" / name
        if not (folder / "model_index.json").is_file():
            save_tiny_wan(folder, TinyWanConfig(image_to_video=i2v), seed=0)
        models[name] = {"path": folder, "default_size": "128x128", "max_frames": 33}
    config = data_dir / "models.toml"
    write_models_config(config, models)
    return config


def _wait_http_ok(url: str, process: ManagedProcess, timeout: float) -> None:
    def ok() -> bool:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200

    process.wait_until_ready(ok, timeout)


@dataclass
class LocalStack:
    data_dir: Path
    postgres: bool = False
    #: "cpu" or "cuda"; default: the GPU when there is one.
    device: str | None = None
    #: The worker's GPU group, e.g. "0,1" for one worker that runs each job on two GPUs.
    gpus: str | None = None
    #: None: ``default_api_port`` if free, else a free port.
    api_port: int | None = None
    default_api_port: int = 8000
    models_config: Path | None = None
    workers: int = 1
    extra_env: dict[str, str] = field(default_factory=dict)
    _services: list[RunningService] = field(default_factory=list, init=False)
    _processes: list[ManagedProcess] = field(default_factory=list, init=False)
    _lock: DataDirLock | None = field(default=None, init=False)
    _port_note: str | None = field(default=None, init=False)

    def start(self) -> StackInfo:
        self.data_dir = Path(self.data_dir).resolve()
        self._lock = DataDirLock(self.data_dir)
        self._lock.acquire()  # DataDirInUse names the pid that holds it
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> StackInfo:
        valkey = start_valkey(self.data_dir / "valkey")
        self._services.append(valkey)
        secret = self._persistent_secret("s3-secret")
        s3 = start_seaweedfs(self.data_dir / "s3", "fvb-local", secret)
        self._services.append(s3)
        if self.postgres:
            from fvb_tools.localstack.postgres import start_postgres

            pg = start_postgres(self.data_dir / "postgres")
            self._services.append(pg)
            database_url = pg.url
        else:
            database_url = f"sqlite:///{self.data_dir / 'fvb.db'}"
        models_config = self.models_config or _demo_models_config(self.data_dir)
        env = {
            "FVB_DATABASE_URL": database_url,
            "FVB_BROKER_URL": valkey.url,
            "FVB_S3_ENDPOINT_URL": s3.endpoint_url,
            "FVB_S3_ACCESS_KEY": "fvb-local",
            "FVB_S3_SECRET_KEY": secret,
            "FVB_MODELS_CONFIG": str(models_config),
            "FVB_API_HOST": HOST,
            **self.extra_env,
        }
        from fvb_core.db.migrate import upgrade

        upgrade(database_url)
        dev_key = self._dev_key(database_url)

        cli = [sys.executable, "-m", "fvb_tools.cli"]
        child_env = {**os.environ, **env}
        self._spawn("scheduler", [*cli, "scheduler"], child_env)
        placement = ["--device", self.device] if self.device else []
        placement += ["--gpus", self.gpus] if self.gpus else []
        for index in range(self.workers):
            self._spawn(f"worker-{index}", [*cli, "worker", *placement], child_env)
        api_port = self._start_api(cli, env)  # the others start meanwhile
        api_url = f"http://{HOST}:{api_port}"
        info = StackInfo(
            api_url=f"{api_url}/v1",
            dev_key=dev_key,
            dashboard_url=f"{api_url}/dashboard#key={dev_key}",
            broker_url=valkey.url,
            s3_endpoint_url=s3.endpoint_url,
            database_url=database_url,
            env={**env, "FVB_API_PORT": str(api_port)},
            data_dir=self.data_dir,
            models_config=models_config,
            api_port_note=self._port_note,
        )
        info.env_file = write_env(
            self.data_dir,
            {**info.env, "FVB_API_URL": info.api_url, "FVB_API_KEY": dev_key},
        )
        return info

    def _start_api(self, cli: list[str], env: dict[str, str]) -> int:
        """The API on the requested port, else the default one (``FVB_API_PORT``, 8000) when it
        is free, else a free one, said in ``_port_note``. A port taken between our check and
        the API's bind is retried on a free port unless the caller asked for that port."""
        self._port_note = None
        port = self.api_port
        if port is None:
            port = self.default_api_port
            if not port_is_free(port):
                fallback = free_port()
                self._port_note = f"port {port} is in use; the API listens on {fallback} instead"
                port = fallback
        elif not port_is_free(port):
            raise PortInUse(f"--api-port {port}: the port is in use; pick another or leave it out")
        for attempt in range(1, 4):
            child_env = {**os.environ, **env, "FVB_API_PORT": str(port)}
            api = self._spawn("api", [*cli, "api"], child_env)
            try:
                _wait_http_ok(f"http://{HOST}:{port}/healthz", api, timeout=60)
                return port
            except ServiceStartError as error:
                self._processes.remove(api)
                api.stop()
                if not error.exited or self.api_port is not None or attempt == 3:
                    raise
                fallback = free_port()
                self._port_note = f"port {port} was taken meanwhile; the API listens on {fallback}"
                port = fallback
        raise AssertionError("unreachable")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> ManagedProcess:
        process = ManagedProcess(
            name, argv, log_path=self.data_dir / "logs" / f"{name}.log", env=env
        )
        process.start()
        self._processes.append(process)
        return process

    def _persistent_secret(self, name: str) -> str:
        path = self.data_dir / name
        if not path.is_file():
            path.write_text(secrets.token_urlsafe(24))
            path.chmod(0o600)
        return path.read_text().strip()

    def _dev_key(self, database_url: str) -> str:
        """The development key, created once per data dir and kept (mode 600) beside it."""
        path = self.data_dir / "dev-key.json"
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored.get("database_url") == database_url:
                return stored["key"]
        from fvb_core.api_keys import create_api_key
        from fvb_core.db.session import session_scope

        with session_scope(database_url) as session:
            key = create_api_key(session, DEV_TENANT, name="local stack dev key")
        path.write_text(json.dumps({"key": key, "database_url": database_url}))
        path.chmod(0o600)
        return key

    def stop(self) -> None:
        """Stop our processes first (they talk to the servers), then the servers; each group
        all at once. The data dir is free again when this returns."""
        stop_together([lambda p=p: p.stop(grace=15) for p in self._processes])
        self._processes.clear()
        stop_together([service.stop for service in self._services])
        self._services.clear()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log_tail(lines)}" for p in self._processes)

    def __enter__(self) -> StackInfo:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
