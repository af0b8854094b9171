"""One rank of a multi-rank generator (started by ``executor.MultiRankExecutor``).

    RANK=r WORLD_SIZE=n LOCAL_RANK=r MASTER_ADDR=... MASTER_PORT=... \\
        python -m fastvideo.executor.rank_main --model-path DIR --args-json FILE [--control-fd FD]

In order: join the world (NCCL on GPUs, gloo on the CPU), build the CFG/SP/TP groups, build
the pipeline (so parallel layers see their coordinates), wait for every rank, then serve:
rank 0 reads a request from the caller (``--control-fd``, its end of a socket pair) and
broadcasts it on a gloo "control" group; every rank runs the pipeline; the ranks agree on the
outcome; rank 0 answers the caller. While idle, rank 0 broadcasts a no-op every
``KEEPALIVE_S``, so no control broadcast waits longer than that and a dead peer is noticed.

A rank exits when the caller says so, when its parent process goes away, when one of its
collectives fails or times out (a peer died or hung; exit code 4), or when the ranks disagree
about a request (one failed, another did not; exit code 3): their collectives may be out of
step, so the caller starts a fresh group instead. ``kill -USR1 <pid>`` writes a rank's stacks
to its log.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import pickle
import signal
import sys
import threading
import time
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fastvideo.distributed import parallel_state
from fastvideo.executor.executor import EXIT_COLLECTIVE_FAILED, EXIT_DISAGREED, KEEPALIVE_S
from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.pipelines.pipeline_batch_info import GenerationCancelled, StepProgress
from fastvideo.pipelines.runner import WireTensor, build_pipeline, encode_prompt, render

log = logging.getLogger("fastvideo.executor.rank")


def _collective_failed(err: BaseException) -> bool:
    """Did a collective fail (a peer died, or hung past the timeout)? NCCL raises
    ``DistError``s; gloo raises plain RuntimeErrors that name its own source files."""
    return isinstance(err, dist.DistError) or (
        isinstance(err, RuntimeError) and "gloo" in str(err).lower()
    )


def _watch_parent() -> None:
    """Exit when the caller dies (its ranks must not outlive it, holding GPU memory)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                log.error("the caller (pid %d) is gone; exiting", parent)
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _choose_device(args: FastVideoArgs, world: int, local_rank: int) -> str:
    """This rank's device: ``cuda:<local_rank>`` of the visible GPUs, or the CPU."""
    wanted = torch.device(args.device) if args.device else None
    if wanted is None:
        wanted = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if wanted.type != "cuda":
        return str(wanted)
    visible = torch.cuda.device_count()
    if visible < world:
        raise ValueError(
            f"num_gpus={world} but only {visible} CUDA device(s) are visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r})"
        )
    return f"cuda:{local_rank}"


def _portable(err: BaseException) -> BaseException:
    """``err`` if it survives pickling (most do), else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


def _send(conn: Connection, message: tuple) -> None:
    try:
        conn.send(message)
    except OSError:
        log.error("the caller hung up; exiting")
        os._exit(1)


class Rank:
    def __init__(self, rank: int, world: int, conn: Connection | None, args: FastVideoArgs):
        self.rank = rank
        self.world = world
        self.conn = conn
        self.args = args
        self.pipeline: Any = None
        self.control: dist.ProcessGroup | None = None

    def start(self, model_path: str, local_rank: int) -> None:
        self.args.device = _choose_device(self.args, self.world, local_rank)
        backend = "nccl" if self.args.device.startswith("cuda") else "gloo"
        if backend == "gloo" and "OMP_NUM_THREADS" not in os.environ:
            # The ranks share the machine's cores.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))
        timeout = self.args.dist_timeout_s
        parallel_state.init_distributed_environment(
            world_size=self.world, rank=self.rank, backend=backend, timeout_s=timeout
        )
        parallel_state.initialize_model_parallel(
            tensor_parallel_size=self.args.tp_size,
            sequence_parallel_size=self.args.sp_size,
            cfg_parallel_size=2 if self.args.cfg_parallel else 1,
        )
        # Requests, keep-alives and outcome agreement travel on CPU tensors whatever the
        # backend. The agreement may wait for a rank stuck in a collective (which fails after
        # ``timeout``), hence the longer limit.
        self.control = dist.new_group(
            backend="gloo", timeout=timedelta(seconds=2 * timeout + KEEPALIVE_S)
        )
        started = time.perf_counter()
        self.pipeline = build_pipeline(model_path, self.args)
        log.info(
            "rank %d/%d: pipeline %s built on %s in %.1fs (sp %d/%d, cfg %d/%d, tp %d/%d)",
            self.rank,
            self.world,
            type(self.pipeline).__name__,
            self.args.device,
            time.perf_counter() - started,
            parallel_state.get_sp_rank(),
            parallel_state.get_sp_world_size(),
            parallel_state.get_cfg_rank(),
            parallel_state.get_cfg_world_size(),
            parallel_state.get_tp_rank(),
            parallel_state.get_tp_world_size(),
        )
        dist.barrier(group=self.control)

    # -- serving -----------------------------------------------------------------------------

    def _next_message(self) -> tuple:
        """Rank 0: the caller's next message (or a keep-alive); every rank gets the same."""
        message: tuple | None = None
        if self.conn is not None:
            try:
                message = self.conn.recv() if self.conn.poll(KEEPALIVE_S) else ("noop",)
            except (EOFError, OSError):
                log.warning("the caller hung up; shutting down")
                message = ("shutdown",)
        box = [message]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def serve(self) -> None:
        served = 0
        while True:
            message = self._next_message()
            kind = message[0]
            if kind == "noop":
                continue
            if kind == "shutdown":
                log.info("rank %d: shutting down after %d request(s)", self.rank, served)
                return
            if kind not in ("generate", "encode"):
                raise RuntimeError(f"unknown message {kind!r}")
            served += 1
            started = time.perf_counter()
            self._answer(*self._run(kind, message[1]))
            log.info(
                "rank %d: request %d done in %.2fs",
                self.rank,
                served,
                time.perf_counter() - started,
            )

    def _forward_progress(self, progress: StepProgress) -> bool:
        assert self.conn is not None
        _send(self.conn, ("progress", progress))
        try:
            kind, stop = self.conn.recv()
        except (EOFError, OSError):
            log.error("the caller hung up mid-request; exiting")
            os._exit(1)
        if kind != "step":
            raise RuntimeError(f"expected the caller's step reply, got {kind!r}")
        return bool(stop)

    def _encode(self, request: dict[str, Any]) -> tuple[WireTensor, WireTensor | None]:
        embeds, negative = encode_prompt(self.pipeline, self.args, request)
        return WireTensor.pack(embeds), WireTensor.pack(negative) if negative is not None else None

    def _run(self, kind: str, request: dict[str, Any]) -> tuple[str, Any]:
        callback = self._forward_progress if self.conn is not None else None
        try:
            if kind == "encode":
                return "ok", self._encode(request)
            return "ok", render(self.pipeline, self.args, request, callback)
        except GenerationCancelled as err:
            return "cancelled", err
        except ValueError as err:  # bad input: every rank says the same, nothing to debug
            log.warning("rank %d: the request was refused: %s", self.rank, err)
            return "error", err
        except Exception as err:
            if _collective_failed(err):
                self._abandon(err)
            log.exception("rank %d: the request failed", self.rank)
            return "error", err

    def _abandon(self, err: BaseException) -> None:
        """A collective failed: the group cannot agree on anything any more. Say so and exit,
        which also breaks the other ranks out of their collectives."""
        log.exception("rank %d: a collective failed; another rank died or hung", self.rank)
        if self.conn is not None:
            first_line = (str(err).strip().splitlines() or [""])[0][:300]
            _send(
                self.conn,
                (
                    "fatal",
                    f"rank {self.rank} of {self.world}: a collective failed or timed out after "
                    f"dist_timeout_s={self.args.dist_timeout_s:g} ({type(err).__name__}: "
                    f"{first_line}); another rank died or hung",
                ),
            )
        sys.stderr.flush()
        os._exit(EXIT_COLLECTIVE_FAILED)

    def _answer(self, kind: str, value: Any) -> None:
        """Agree with the other ranks on how the request ended; rank 0 tells the caller."""
        mine = ("ok", "", "")
        if kind != "ok":
            mine = (kind, type(value).__name__ if kind == "error" else "", str(value)[:500])
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, mine, group=self.control)
        alike = all(theirs[:2] == mine[:2] for theirs in everyone)
        if self.conn is not None:
            if not alike:
                lines = "; ".join(
                    f"rank {r}: {k}" + (f" {t}: {m}" if t else "")
                    for r, (k, t, m) in enumerate(everyone)
                )
                _send(self.conn, ("fatal", f"the ranks disagree about the request ({lines})"))
            elif kind == "ok":
                _send(self.conn, ("result", value))
            elif kind == "cancelled":
                _send(self.conn, ("cancelled", str(value)))
            else:
                _send(self.conn, ("error", _portable(value)))
        if not alike:
            log.error(
                "rank %d: the ranks disagree about the request: %s; exiting", self.rank, everyone
            )
            sys.stderr.flush()
            os._exit(EXIT_DISAGREED)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastvideo.executor.rank_main")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--args-json", required=True, help="FastVideoArgs as JSON")
    parser.add_argument("--control-fd", type=int, default=None, help="rank 0: the caller's socket")
    ns = parser.parse_args(argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    # This process's stderr is the rank's log file: the executor's own messages at INFO,
    # everything else as ``fastvideo.logger`` and the libraries configure it.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    )
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    # ``kill -USR1 <pid>`` writes every thread's stack to the log: what a hung rank is doing.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    _watch_parent()
    args = FastVideoArgs(**json.loads(Path(ns.args_json).read_text()))
    args.validate()
    conn = Connection(ns.control_fd) if ns.control_fd is not None else None
    this = Rank(rank, world, conn, args)
    try:
        this.start(ns.model_path, local_rank)
    except Exception as err:
        log.exception("rank %d: start-up failed", rank)
        if conn is not None:
            _send(conn, ("error", _portable(err)))
        return 1
    if conn is not None:
        _send(conn, ("ready", {"world_size": world, "device": args.device}))
    this.serve()
    parallel_state.destroy_model_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
