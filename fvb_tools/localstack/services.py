"""What a start_* function returns: a running server, its address, and how to stop it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

from fvb_tools.localstack.process import ManagedProcess, ServiceStartError

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RunningService:
    """A server on 127.0.0.1:`port`, serving `url`, with its files under `data_dir`.

    `restart()` brings it back on the same port with the same data; `pause()`/`resume()`
    freeze it in place (clients then time out instead of being refused). Usable as a context
    manager that stops the server on exit.
    """

    name: str
    url: str
    port: int
    data_dir: Path
    process: ManagedProcess
    ready: Callable[[], bool] = field(repr=False)
    ready_timeout: float = 30.0
    # Seconds from spawn to ready, for the latest start or restart.
    startup_seconds: float = 0.0
    # Run after the process has stopped (weed leaves Unix sockets in /tmp, for instance).
    after_stop: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def start(self) -> float:
        """Spawn the process and wait until `ready()` holds; return the seconds it took."""
        self.process.start()
        try:
            self.startup_seconds = self.process.wait_until_ready(self.ready, self.ready_timeout)
        except BaseException:
            self.stop()
            raise
        log.info("%s ready at %s in %.2f s", self.name, self.url, self.startup_seconds)
        return self.startup_seconds

    def stop(self, grace: float = 10.0) -> None:
        self.process.stop(grace)
        if self.after_stop is not None:
            self.after_stop()

    def restart(self, grace: float = 10.0) -> float:
        """Stop, then start again with the same command line: same port, same data."""
        self.stop(grace)
        return self.start()

    def pause(self) -> None:
        self.process.pause()

    def resume(self) -> None:
        self.process.resume()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass(kw_only=True)
class S3Service(RunningService):
    """An S3 endpoint (`url` is the endpoint URL) that accepts one access key pair."""

    access_key: str
    secret_key: str = field(repr=False)
    region: str = "us-east-1"

    @property
    def endpoint_url(self) -> str:
        return self.url

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this endpoint; `config` goes to botocore's Config."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, **config),
        )


ServiceT = TypeVar("ServiceT", bound=RunningService)


def launch(spawn: Callable[[], ServiceT], attempts: int = 3) -> ServiceT:
    """Start the service `spawn()` describes, retrying with a fresh one if the process dies.

    Ports are picked before the server binds them, so another process can take one in between;
    the server then exits at once and a new `spawn()` (which picks new ports) usually succeeds.
    A server that stays up but never becomes ready is not retried.
    """
    for attempt in range(1, attempts + 1):
        service = spawn()
        try:
            service.start()
            return service
        except ServiceStartError as error:
            if not error.exited or attempt == attempts:
                raise
            log.warning("%s died during start-up (attempt %d), retrying", service.name, attempt)
    raise AssertionError("unreachable")
