"""A child server process in its own process group, with a log file and a clean stop.

Every started process is tracked until stopped, and an atexit hook stops the rest, so a test
run or a demo that forgets to stop a server does not leave it running. A parent that dies
without running atexit (SIGKILL, the OOM killer) takes its children with it too: each child
asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``, Linux), see
:func:`die_with_parent`.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# Loaded here, in the parent: the forked child must not dlopen (it may hold no locks).
_libc = (
    ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None
)


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive ``sig`` when this process dies.

    Linux delivers the signal when the *thread* that forked the child exits, so
    :class:`ManagedProcess` forks only from threads that live as long as the process (see
    :class:`_Spawner`); pass this to ``subprocess.Popen`` yourself only from
    the main thread. The check of ``getppid`` closes the race of a parent that died between
    ``fork`` and ``prctl``. Returns None where the kernel has no such request (not Linux).
    """
    if _libc is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        # Runs in the child after subprocess has dropped privileges (setreuid comes first),
        # so the setting survives: a change of credentials would clear it.
        _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


class _Spawner:
    """A daemon thread that runs ``Popen`` for callers on short-lived threads.

    The parent-death signal follows the forking thread: a server started from a thread that
    then ends would be killed with it. The main thread and this one last until the process
    exits (daemon threads are never joined, not even at interpreter shutdown).
    """

    def __init__(self) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, make: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
        if threading.current_thread() is threading.main_thread():
            return make()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="fvb-spawner", daemon=True)
                self._thread.start()
        done: queue.Queue = queue.Queue(maxsize=1)
        self._requests.put((make, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def _serve(self) -> None:
        while True:
            make, done = self._requests.get()
            try:
                done.put((True, make()))
            except BaseException as error:  # handed back to the caller's thread
                done.put((False, error))


_spawner = _Spawner()

_live: set[ManagedProcess] = set()
_live_lock = threading.Lock()


class ServiceStartError(RuntimeError):
    """A server did not become ready. `exited` says whether its process had already died."""

    def __init__(self, message: str, *, exited: bool) -> None:
        super().__init__(message)
        self.exited = exited


class ManagedProcess:
    """One server binary, started with `start()` and stopped with `stop()`, restartable.

    The process leads a new session (so a new process group): signals go to the whole group,
    which also reaches any helpers the server forks, and Ctrl-C in a terminal running the
    parent does not hit the servers before the parent can stop them in order.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stop_signal: int = signal.SIGTERM,
        user: int | None = None,
        group: int | None = None,
    ) -> None:
        self.name = name
        self.argv = [os.fspath(arg) for arg in argv]
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.stop_signal = stop_signal
        self.user = user
        self.group = group
        self._popen: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"ManagedProcess({self.name!r}, pid={self.pid}, running={self.is_running()})"

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll() if self._popen is not None else None

    def is_running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(self) -> None:
        if self.is_running():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Append: a restart keeps the earlier log, which is what one reads after a failure.
        with open(self.log_path, "ab") as log_file:
            kwargs: dict[str, object] = {}
            if self.user is not None:
                # Dropping privileges in the child (setgroups/setregid/setreuid before exec)
                # needs no su/runuser/setpriv on the machine.
                kwargs = {"user": self.user, "group": self.group, "extra_groups": []}
            self._popen = _spawner.run(
                lambda: subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    cwd=self.cwd,
                    start_new_session=True,
                    preexec_fn=die_with_parent(),
                    **kwargs,  # type: ignore[arg-type]
                )
            )
        with _live_lock:
            _live.add(self)
        log.debug("started %s (pid %s): %s", self.name, self._popen.pid, " ".join(self.argv))

    def wait_until_ready(
        self, check: Callable[[], bool], timeout: float, interval: float = 0.05
    ) -> float:
        """Poll `check` until it returns True; return the seconds waited.

        A check that raises counts as "not yet" (connection refused is the usual answer while a
        server starts). Raises ServiceStartError with the log's tail if the process exits or
        `timeout` passes first.
        """
        started = time.monotonic()
        deadline = started + timeout
        while True:
            if not self.is_running():
                raise ServiceStartError(
                    f"{self.name} exited with code {self.returncode} during start-up\n"
                    f"{self.log_tail()}",
                    exited=True,
                )
            try:
                if check():
                    return time.monotonic() - started
            except Exception as error:  # any failure of the probe means "not ready yet"
                log.debug("%s not ready: %s", self.name, error)
            if time.monotonic() >= deadline:
                raise ServiceStartError(
                    f"{self.name} not ready after {timeout:.0f} s\n{self.log_tail()}",
                    exited=False,
                )
            time.sleep(interval)

    def stop(self, grace: float = 10.0) -> None:
        """Signal the group with `stop_signal`; SIGKILL whatever is left after `grace` s."""
        popen = self._popen
        if popen is None:
            return
        try:
            if popen.poll() is None:
                self._signal_group(self.stop_signal)
                # A paused (SIGSTOPped) server holds the signal until it runs again.
                self._signal_group(signal.SIGCONT)
                try:
                    popen.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    log.warning(
                        "%s ignored signal %s for %.0f s; killing",
                        self.name,
                        self.stop_signal,
                        grace,
                    )
                    self._signal_group(signal.SIGKILL)
                    popen.wait()
            # The leader is gone; sweep helpers it may have left in the group. Its pid stays
            # reserved while any member lives, so this cannot hit an unrelated process group.
            self._signal_group(signal.SIGKILL)
        finally:
            with _live_lock:
                _live.discard(self)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): its ports stay open but nothing answers.

        The group signal misses children that lead sessions of their own (PostgreSQL's
        backends call setsid), so every descendant is stopped too; the leader first, so it
        forks nothing new while they are listed.
        """
        self._signal_group(signal.SIGSTOP)
        for pid in _descendants(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in _descendants(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._signal_group(signal.SIGCONT)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log_path})"
        return "\n".join(text.splitlines()[-lines:])

    def _signal_group(self, sig: int) -> None:
        if self._popen is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._popen.pid, sig)


def _descendants(root: int | None) -> list[int]:
    """Every process below ``root``, from /proc (Linux; empty elsewhere)."""
    if root is None or not os.path.isdir("/proc"):
        return []
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
                ppid = int(stat.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, frontier = [], [root]
    while frontier:
        below = children.get(frontier.pop(), [])
        found += below
        frontier += below
    return found


def stop_together(stops: Sequence[Callable[[], None]]) -> None:
    """Run every stop at once (each may wait its grace period), and wait for all of them.

    One after another, N processes that ignore SIGTERM would take N grace periods.
    """
    threads = [threading.Thread(target=_quietly, args=(stop,), daemon=True) for stop in stops]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _quietly(stop: Callable[[], None]) -> None:
    try:
        stop()
    except Exception:
        log.exception("stopping a process failed")


@atexit.register
def _stop_all() -> None:
    with _live_lock:
        leftovers = list(_live)
    stop_together([lambda p=process: p.stop(grace=5.0) for process in leftovers])
