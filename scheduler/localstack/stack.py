"""``fvb up``: the whole service on one machine, from PyPI packages, on loopback.

Valkey, SeaweedFS S3 and the database (an SQLite file, or embedded PostgreSQL), then our
API, scheduler and one worker as child processes, all configured through FVB_* variables
exactly as in production. With no models config, a tiny random-weight Wan2.1 model is built.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from scheduler.localstack.ports import free_port
from scheduler.localstack.process import ManagedProcess
from scheduler.localstack.seaweed import start_seaweedfs
from scheduler.localstack.services import RunningService
from scheduler.localstack.valkey import start_valkey

DEV_TENANT = "dev"


@dataclass
class StackInfo:
    api_url: str
    dev_key: str
    dashboard_url: str
    env: dict[str, str]
    data_dir: Path
    models_config: Path


def _demo_models_config(data_dir: Path) -> Path:
    """Build the tiny random-weight models (once) and a models config naming them."""
    from diffusers.utils import logging as diffusers_logging

    from fastvideo.testing.tiny_wan import TinyWanConfig, save_tiny_wan
    from scheduler.models_config import write_models_config

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
    api_port: int | None = None
    models_config: Path | None = None
    workers: int = 1
    extra_env: dict[str, str] = field(default_factory=dict)
    _services: list[RunningService] = field(default_factory=list, init=False)
    _processes: list[ManagedProcess] = field(default_factory=list, init=False)

    def start(self) -> StackInfo:
        self.data_dir = Path(self.data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
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
            from scheduler.localstack.postgres import start_postgres

            pg = start_postgres(self.data_dir / "postgres")
            self._services.append(pg)
            database_url = pg.url
        else:
            database_url = f"sqlite:///{self.data_dir / 'fvb.db'}"
        models_config = self.models_config or _demo_models_config(self.data_dir)
        api_port = self.api_port or free_port()
        env = {
            "FVB_DATABASE_URL": database_url,
            "FVB_BROKER_URL": valkey.url,
            "FVB_S3_ENDPOINT_URL": s3.endpoint_url,
            "FVB_S3_ACCESS_KEY": "fvb-local",
            "FVB_S3_SECRET_KEY": secret,
            "FVB_MODELS_CONFIG": str(models_config),
            "FVB_API_HOST": "127.0.0.1",
            "FVB_API_PORT": str(api_port),
            **self.extra_env,
        }
        from scheduler.db.migrate import upgrade

        upgrade(database_url)
        dev_key = self._dev_key(database_url)

        child_env = {**os.environ, **env}
        cli = [sys.executable, "-m", "scheduler.cli"]
        api = self._spawn("api", [*cli, "api"], child_env)
        self._spawn("scheduler", [*cli, "scheduler"], child_env)
        placement = ["--device", self.device] if self.device else []
        placement += ["--gpus", self.gpus] if self.gpus else []
        for index in range(self.workers):
            self._spawn(f"worker-{index}", [*cli, "worker", *placement], child_env)
        api_url = f"http://127.0.0.1:{api_port}"
        _wait_http_ok(f"{api_url}/healthz", api, timeout=60)
        return StackInfo(
            api_url=f"{api_url}/v1",
            dev_key=dev_key,
            dashboard_url=f"{api_url}/dashboard#key={dev_key}",
            env=env,
            data_dir=self.data_dir,
            models_config=models_config,
        )

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
        from scheduler.api.auth import create_api_key
        from scheduler.db.session import session_scope

        with session_scope(database_url) as session:
            key = create_api_key(session, DEV_TENANT, name="local stack dev key")
        path.write_text(json.dumps({"key": key, "database_url": database_url}))
        path.chmod(0o600)
        return key

    def stop(self) -> None:
        """Stop our processes first (they talk to the servers), then the servers."""
        for process in reversed(self._processes):
            process.stop(grace=15)
        self._processes.clear()
        for service in reversed(self._services):
            service.stop()
        self._services.clear()

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log_tail(lines)}" for p in self._processes)

    def __enter__(self) -> StackInfo:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def wait_forever() -> None:
    while True:
        time.sleep(3600)
