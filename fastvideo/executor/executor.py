"""The caller's side of a multi-rank generator: start the ranks, feed rank 0, watch them all.

Protocol over one private socket pair with rank 0 (pickled tuples, nothing else listens):

    caller -> rank 0   ("generate", request) | ("encode", request) | ("step", stop)
                       | ("shutdown",)
    rank 0 -> caller   ("ready", info) | ("progress", StepProgress) | ("result", RenderOutput
                       or, for "encode", (WireTensor, WireTensor | None)) | ("cancelled", message)
                       | ("error", exception) | ("fatal", message)

Rank 0 sends ``progress`` after every denoising step and waits for the caller's ``step``
reply, so the user's callback runs here, in order, and its stop decision reaches every rank
at the same step. ``error`` is an exception every rank raised alike (bad input): the ranks
stay up. ``fatal`` means the ranks disagreed about the request; they exit.

Failure handling: while waiting, the caller polls every rank's liveness. A rank that exits,
or a group that says nothing for longer than its collectives could block
(:attr:`hang_timeout_s`), fails the request with :class:`RankGroupError` naming the rank, its
exit code and the tail of its log; the whole group is stopped and started again on the next
request.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.pipelines.pipeline_batch_info import GenerationCancelled, StepCallback

if TYPE_CHECKING:  # the ranks' output types; the caller need not import the pipelines
    from fastvideo.pipelines.runner import RenderOutput, WireTensor

log = logging.getLogger(__name__)

#: How often the caller checks that every rank is still alive while it waits.
POLL_INTERVAL_S = 0.2
#: Rank 0 broadcasts a no-op this often while idle, so ranks notice a dead peer early.
KEEPALIVE_S = 30.0
#: After a rank is found dead, how long rank 0 still has to deliver its own error (a start-up
#: error every rank hit: the others may exit first).
_DEATH_GRACE_S = 1.0
_LOG_TAIL_CHARS = 3000
#: Exit codes of a rank that ends itself because of another: its collective failed or timed
#: out, the ranks disagreed about a request, or an uncaught error (Python's 1).
EXIT_COLLECTIVE_FAILED = 4
EXIT_DISAGREED = 3
_FOLLOWER_EXIT_CODES = (1, EXIT_COLLECTIVE_FAILED, EXIT_DISAGREED)


class RankGroupError(RuntimeError):
    """A rank died, hung or disagreed with the others; the group restarts on the next request."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            return f"killed by signal {-code} (exit code {code})"
    return f"exit code {code}"


@dataclass
class _Rank:
    rank: int
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return text[-_LOG_TAIL_CHARS:].strip() or "(empty log)"


class MultiRankExecutor:
    """N long-lived rank processes running one pipeline together.

    Not thread-safe across concurrent requests: :meth:`generate` calls are serialised.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        fastvideo_args: FastVideoArgs,
        startup_timeout_s: float = 3600.0,
        hang_timeout_s: float | None = None,
    ) -> None:
        if fastvideo_args.num_gpus < 2:
            raise ValueError(
                f"a multi-rank executor needs num_gpus >= 2, got {fastvideo_args.num_gpus}"
            )
        self.model_path = Path(model_path)
        self.fastvideo_args = fastvideo_args
        self.world_size = fastvideo_args.num_gpus
        self.startup_timeout_s = startup_timeout_s
        #: Longest silence from rank 0 during a request before the group counts as hung: a
        #: rank stuck in a collective fails after ``dist_timeout_s`` on its own, and the
        #: ranks' agreement on the outcome waits at most twice that.
        self.hang_timeout_s = hang_timeout_s or 2 * fastvideo_args.dist_timeout_s + 60.0
        self._run_dir = Path(tempfile.mkdtemp(prefix="fastvideo-ranks-"))
        self._ranks: list[_Rank] = []
        self._conn: Connection | None = None
        self._generation = 0
        self._broken = False
        self._closed = False
        self._in_request = False
        self._lock = threading.Lock()
        # atexit holds only a weak reference, so a dropped executor can still be collected.
        ref = weakref.ref(self)
        self._atexit = lambda: (executor := ref()) is not None and executor.close()
        atexit.register(self._atexit)

    # -- life cycle --------------------------------------------------------------------------

    @property
    def pids(self) -> list[int]:
        """Process ids of the ranks, in rank order."""
        return [r.popen.pid for r in self._ranks]

    def start(self) -> None:
        """Start the ranks and wait until every one has loaded the pipeline."""
        if self._closed:
            raise RuntimeError("this multi-rank executor is closed")
        self._stop_ranks()
        self._generation += 1
        config = self._run_dir / "fastvideo_args.json"
        try:
            config.write_text(json.dumps(dataclasses.asdict(self.fastvideo_args)))
        except TypeError as err:
            raise ValueError(
                f"with num_gpus > 1 every FastVideoArgs field, pipeline_options included, must "
                f"be JSON-serialisable to reach the ranks: {err}"
            ) from None
        port = _free_port()
        parent_sock, child_sock = socket.socketpair()
        package_root = str(Path(__file__).resolve().parents[2])
        base_env = dict(os.environ)
        base_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, base_env.get("PYTHONPATH")) if p
        )
        base_env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE=str(self.world_size),
            LOCAL_WORLD_SIZE=str(self.world_size),
            PYTHONUNBUFFERED="1",
        )
        try:
            for rank in range(self.world_size):
                env = dict(base_env, RANK=str(rank), LOCAL_RANK=str(rank))
                command = [
                    sys.executable,
                    "-m",
                    "fastvideo.executor.rank_main",
                    "--model-path",
                    str(self.model_path),
                    "--args-json",
                    str(config),
                ]
                pass_fds: tuple[int, ...] = ()
                if rank == 0:
                    command += ["--control-fd", str(child_sock.fileno())]
                    pass_fds = (child_sock.fileno(),)
                log_path = self._run_dir / f"g{self._generation}-rank{rank}.log"
                with open(log_path, "wb") as log_file:
                    popen = subprocess.Popen(
                        command,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        pass_fds=pass_fds,
                        # Ctrl-C reaches the caller, which stops the ranks itself.
                        start_new_session=True,
                    )
                self._ranks.append(_Rank(rank, popen, log_path))
        except BaseException:
            parent_sock.close()
            self._stop_ranks()
            raise
        finally:
            child_sock.close()
        self._conn = Connection(parent_sock.detach())
        self._broken = True  # until "ready" arrives
        log.info(
            "started %d ranks (pids %s) for %s; logs in %s",
            self.world_size,
            self.pids,
            self.model_path,
            self._run_dir,
        )
        try:
            kind, payload = self._receive(self.startup_timeout_s, "loading the pipeline")
        except BaseException:
            self._stop_ranks()
            raise
        if kind == "error":
            self._stop_ranks()
            raise payload
        if kind != "ready":
            self._stop_ranks()
            raise RankGroupError(f"rank 0 sent {kind!r} while loading the pipeline: {payload}")
        self._broken = False
        log.info("ranks ready: %s", payload)

    def close(self) -> None:
        """Ask the ranks to exit, then make sure they have (idempotent)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._atexit)
        with self._lock:
            asked = False
            if self._conn is not None and not self._broken and self._alive():
                with contextlib.suppress(OSError):
                    self._conn.send(("shutdown",))
                    asked = True
            self._stop_ranks(grace_s=10.0 if asked else 0.0)
        shutil.rmtree(self._run_dir, ignore_errors=True)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if not self._closed:
                self._stop_ranks(grace_s=0.0)

    def _alive(self) -> bool:
        return bool(self._ranks) and all(r.popen.poll() is None for r in self._ranks)

    def _stop_ranks(self, grace_s: float = 2.0) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        ranks, self._ranks = self._ranks, []
        deadline = time.monotonic() + grace_s
        for r in ranks:
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        for r in ranks:
            if r.popen.poll() is None:
                r.popen.kill()  # a rank blocked in a collective may not answer anything gentler
        for r in ranks:
            r.popen.wait()

    # -- requests ----------------------------------------------------------------------------

    def generate(self, request: dict[str, Any], callback: StepCallback | None) -> RenderOutput:
        """Run one request on every rank; rank 0's output comes back.

        Raises what every rank raised alike (``ValueError`` for bad input,
        ``GenerationCancelled`` when ``callback`` asked to stop), or :class:`RankGroupError`
        when a rank died, hung or disagreed (the group restarts on the next request).
        """
        return self._request("generate", request, callback)

    def encode(self, request: dict[str, Any]) -> tuple[WireTensor, WireTensor | None]:
        """Run only the text-encoding stage of a request on every rank (a tensor-parallel
        text encoder needs them all): rank 0's ``(prompt_embeds, negative_prompt_embeds)``.
        Fails as :meth:`generate` does."""
        return self._request("encode", request, None)

    def _request(self, kind: str, request: dict[str, Any], callback: StepCallback | None) -> Any:
        with self._lock:
            if self._closed:
                raise RuntimeError("this multi-rank executor is closed")
            if self._broken or not self._alive():
                dead = [r for r in self._ranks if r.popen.poll() is not None]
                if dead:
                    log.warning(
                        "rank %d exited while idle (%s); restarting the group",
                        dead[0].rank,
                        _describe_exit(dead[0].popen.returncode),
                    )
                self.start()
            self._in_request = True
            try:
                return self._run(kind, request, callback)
            except BaseException:
                # Still mid-request (a rank died or hung, KeyboardInterrupt while waiting):
                # the ranks' state is unknown, so stop them and start afresh next time. An
                # outcome the ranks reported (bad input, cancelled) leaves them ready.
                if self._in_request:
                    self._broken = True
                    self._stop_ranks(grace_s=0.0)
                raise

    def _run(self, kind: str, request: dict[str, Any], callback: StepCallback | None) -> Any:
        assert self._conn is not None
        self._send((kind, request))
        callback_error: BaseException | None = None
        while True:
            kind, payload = self._receive(self.hang_timeout_s, "running the request")
            # A reported outcome ends the request; anything else leaves the ranks mid-way.
            self._in_request = kind not in ("result", "cancelled", "error")
            if kind == "progress":
                stop = callback_error is not None
                if not stop and callback is not None:
                    try:
                        stop = bool(callback(payload))
                    except BaseException as err:  # stop the ranks first, then re-raise
                        callback_error, stop = err, True
                self._send(("step", stop))
            elif kind == "result":
                if callback_error is not None:
                    raise callback_error
                return payload
            elif kind == "cancelled":
                if callback_error is not None:
                    raise callback_error
                raise GenerationCancelled(payload)
            elif kind == "error":
                raise payload
            elif kind == "fatal":
                # A rank killed meanwhile is the likelier cause than the one that reports it.
                died = self._death_error("running the request", wait_s=1.0, root_cause=True)
                if died is not None:
                    raise RankGroupError(f"{died}\n(rank 0 reported: {payload})")
                raise RankGroupError(payload)
            else:
                raise RankGroupError(f"rank 0 sent an unexpected {kind!r} message")

    def _send(self, message: tuple) -> None:
        assert self._conn is not None
        try:
            self._conn.send(message)
        except OSError as err:
            raise self._death_error("talking to rank 0") or RankGroupError(
                f"rank 0 is unreachable ({err})"
            ) from err

    def _receive(self, silence_limit_s: float, doing: str) -> tuple[str, Any]:
        """The next message from rank 0, checking every rank's liveness while waiting."""
        assert self._conn is not None
        deadline = time.monotonic() + silence_limit_s
        while True:
            try:
                if self._conn.poll(POLL_INTERVAL_S):
                    return self._conn.recv()
            except (EOFError, OSError) as err:
                # Rank 0 closed its end: it is exiting; say how, once it has.
                error = self._death_error(doing, wait_s=5.0)
                raise error or RankGroupError(f"rank 0 hung up while {doing}") from err
            error = self._death_error(doing)
            if error is not None:
                # Rank 0 may still have the real reason (an error every rank hit) to send.
                with contextlib.suppress(EOFError, OSError):
                    if self._conn.poll(_DEATH_GRACE_S):
                        message = self._conn.recv()
                        if message[0] in ("error", "fatal"):
                            return message
                raise error
            if time.monotonic() > deadline:
                raise RankGroupError(
                    f"no word from rank 0 for {silence_limit_s:.0f}s while {doing}; the rank "
                    f"group looks hung and is being restarted. Rank 0 log:\n"
                    f"{self._ranks[0].log_tail()}"
                )

    def _death_error(
        self, doing: str, wait_s: float = 0.0, root_cause: bool = False
    ) -> RankGroupError | None:
        """The error for the rank that died (waiting up to ``wait_s`` for one), or None.

        Ranks that exit because a peer died follow it with one of ``_FOLLOWER_EXIT_CODES``;
        one killed by a signal or exiting otherwise is named first. ``root_cause``: only
        such a rank counts.
        """

        def causes(rank: _Rank) -> bool:
            code = rank.popen.poll()
            return code is not None and (not root_cause or code not in _FOLLOWER_EXIT_CODES)

        deadline = time.monotonic() + wait_s
        while True:
            dead = [r for r in self._ranks if causes(r)]
            if dead or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if not dead:
            return None
        first = min(dead, key=lambda r: (r.popen.returncode in _FOLLOWER_EXIT_CODES, r.rank))
        return RankGroupError(
            f"rank {first.rank} of {self.world_size} (pid {first.popen.pid}) "
            f"{_describe_exit(first.popen.returncode)} while {doing}; the rank group will be "
            f"restarted. Last lines of its log ({first.log_path}):\n{first.log_tail()}"
        )
