"""What a running ``fvb up`` keeps in its data dir: a lock that names its pid, and an env file
that names its endpoints and dev key for the other ``fvb`` commands.

The lock is an ``flock`` on ``fvb-up.lock``: the kernel drops it when the process dies, however
it dies, so a stale file never blocks the next start. ``stack.env`` holds ``FVB_*`` lines that a
shell can source (``. .fvb/stack.env``); ``fvb submit`` and ``fvb keys`` read it while the
stack that wrote it still holds the lock, and ignore it otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
from pathlib import Path

LOCK_FILE = "fvb-up.lock"
ENV_FILE = "stack.env"


class DataDirInUse(RuntimeError):
    """Another process holds the data dir."""

    def __init__(self, data_dir: Path, pid: int | None) -> None:
        owner = f"pid {pid}" if pid else "another process"
        super().__init__(
            f"data dir {data_dir} is in use by {owner} (a running `fvb up` or demo); stop it "
            "first, or give another --data-dir"
        )
        self.pid = pid


def _read_pid(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().strip() or 0) or None
    return None


class DataDirLock:
    """Exclusive use of ``data_dir`` for this process, until :meth:`release` or exit."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirInUse(self.data_dir, _read_pid(self.path)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                (self.data_dir / ENV_FILE).unlink(missing_ok=True)
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def holder_pid(data_dir: Path) -> int | None:
    """The pid of the live process holding ``data_dir``, or None when nobody does."""
    path = Path(data_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(path) or -1
    finally:
        os.close(fd)  # also drops our probe lock, if we got it
    return None


def write_env(data_dir: Path, values: dict[str, str]) -> Path:
    """Write ``stack.env`` (mode 600: it holds the dev key and the S3 secret)."""
    path = Path(data_dir) / ENV_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"# Written by `fvb up`; removed when it stops. Source it: . {path}\n")
        for key, value in values.items():
            handle.write(f"{key}={shlex.quote(value)}\n")
    return path


def read_live_env(data_dir: Path) -> dict[str, str]:
    """``stack.env`` of the stack running in ``data_dir``; empty when none runs there."""
    path = Path(data_dir) / ENV_FILE
    if holder_pid(data_dir) is None or not path.is_file():
        return {}
    values = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or "=" not in line:
            continue
        key, _, raw = line.partition("=")
        parts = shlex.split(raw)
        values[key.strip()] = parts[0] if parts else ""
    return values
