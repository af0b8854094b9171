"""Run a function on N CPU ranks over gloo and collect what each returns (tests, benchmarks).

    results = run_on_ranks(fn, world_size=4, args=(...), sp_size=2, cfg_parallel_size=2)

``backend="nccl"`` runs one rank per GPU (rank r on cuda:r) instead of CPU ranks.
``fn(*args)`` runs in every rank after the world and model-parallel groups exist; it must be
importable (a module-level function) because ranks are fresh ``spawn``ed interpreters.
Tensors in the returned values come back on the CPU.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from fastvideo.distributed import parallel_state


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    out_dir: str,
    fn: Callable[..., Any],
    args: tuple,
    layout: dict[str, int | None],
    backend: str = "gloo",
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        parallel_state.init_distributed_environment(
            world_size=world_size, rank=rank, backend=backend, timeout_s=300
        )
        parallel_state.initialize_model_parallel(
            tensor_parallel_size=layout["tp_size"] or 1,
            sequence_parallel_size=layout["sp_size"],
            cfg_parallel_size=layout["cfg_parallel_size"] or 1,
        )
        result: Any = ("ok", fn(*args))
    except BaseException:
        result = ("error", traceback.format_exc())
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    parallel_state.destroy_model_parallel()


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    sp_size: int | None = None,
    tp_size: int = 1,
    cfg_parallel_size: int = 1,
    backend: str = "gloo",
) -> list[Any]:
    layout = {"sp_size": sp_size, "tp_size": tp_size, "cfg_parallel_size": cfg_parallel_size}
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _rank_main,
            args=(world_size, _free_port(), out_dir, fn, args, layout, backend),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        results = [
            torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)
        ]
    errors = [f"rank {r}:\n{value}" for r, (kind, value) in enumerate(results) if kind == "error"]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [value for _, value in results]
