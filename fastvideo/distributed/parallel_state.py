"""Where this process sits in the parallel layout, and the process groups that connect it.

World of N ranks = ``cfg`` CFG-parallel groups x ``sp`` sequence-parallel ranks each
(N = cfg * sp). Rank r has ``cfg_rank = r // sp`` (which guidance branch it computes: 0 the
conditional pass, 1 the unconditional one) and ``sp_rank = r % sp`` (its slice of the token
sequence). The text encoder's tensor-parallel groups are contiguous blocks of ``tp`` ranks
over the same world (``tp`` divides N); every TP group computes the same embeddings.

    N=4, cfg=2, tp=2:  sp groups [0,1] [2,3]   cfg groups [0,2] [1,3]   tp groups [0,1] [2,3]

Sequence-parallel attention may factor each SP group as ``ulysses x ring``
(``get_sp_ulysses_ring_groups``): SP rank ``s = ring_rank * ulysses + ulysses_rank``, so a
Ulysses group is ``ulysses`` consecutive SP ranks and a ring group the SP ranks with the same
``ulysses_rank``. The sub-groups of every factorisation of ``sp`` are created here, once:

    sp=4, ulysses=2:  ulysses groups [0,1] [2,3]   ring groups [0,2] [1,3]

Before ``initialize_model_parallel`` every degree is 1 and every rank is 0: the
single-process engine. ``tensor_parallel_coordinates`` lets a caller act as TP rank ``r``
of ``n`` without a process group (offline slicing, weight-loader tests).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class _GroupCoordinates:
    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None
    ranks: tuple[int, ...] = (0,)


_COLLECTIVE_TIMEOUT = timedelta(seconds=600)
_TP = _GroupCoordinates()
_SP = _GroupCoordinates()
_CFG = _GroupCoordinates()
# ulysses degree -> (this rank's Ulysses group, its ring group), for each divisor of sp.
_SP_FACTORS: dict[int, tuple[_GroupCoordinates, _GroupCoordinates]] = {}


def get_world_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def get_tp_rank() -> int:
    return _TP.rank


def get_tp_world_size() -> int:
    return _TP.world_size


def get_tp_group() -> dist.ProcessGroup | None:
    return _TP.group


def get_sp_rank() -> int:
    return _SP.rank


def get_sp_world_size() -> int:
    return _SP.world_size


def get_sp_group() -> dist.ProcessGroup | None:
    return _SP.group


def get_sp_ulysses_ring_groups(
    ulysses_size: int,
) -> tuple[_GroupCoordinates, _GroupCoordinates]:
    """This rank's (Ulysses, ring) sub-groups of its SP group, for ``ulysses_size`` dividing
    the SP degree (see the module docstring for the layout)."""
    if ulysses_size not in _SP_FACTORS:
        if _SP.world_size == 1 and ulysses_size == 1:
            return _GroupCoordinates(), _GroupCoordinates()
        raise ValueError(
            f"ulysses_size={ulysses_size} must divide the sequence-parallel size {_SP.world_size}"
        )
    return _SP_FACTORS[ulysses_size]


def get_cfg_rank() -> int:
    return _CFG.rank


def get_cfg_world_size() -> int:
    return _CFG.world_size


def get_cfg_group() -> dist.ProcessGroup | None:
    return _CFG.group


def model_parallel_is_initialized() -> bool:
    return _SP.group is not None or _TP.group is not None or _CFG.group is not None


def init_distributed_environment(
    world_size: int | None = None,
    rank: int | None = None,
    backend: str | None = None,
    init_method: str = "env://",
    timeout_s: float = 600.0,
) -> None:
    """Join the world group; reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK when not given.

    NCCL when CUDA is available, gloo otherwise. ``timeout_s`` bounds every collective, so a
    rank that died makes the others fail with an error instead of hanging forever.
    """
    global _COLLECTIVE_TIMEOUT
    if dist.is_initialized():
        return
    _COLLECTIVE_TIMEOUT = timedelta(seconds=timeout_s)
    world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    rank = rank if rank is not None else int(os.environ.get("RANK", 0))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        world_size=world_size,
        rank=rank,
        timeout=timedelta(seconds=timeout_s),
    )


def _member_group(blocks: list[list[int]], rank: int) -> _GroupCoordinates:
    """Create every group of ``blocks`` (all ranks must call new_group for each, in the same
    order) and return this rank's coordinates in the one that contains it."""
    mine = _GroupCoordinates()
    for ranks in blocks:
        # Sub-groups need the timeout too: torch otherwise gives them its own default (30 min
        # on gloo), and a frozen rank would hang the survivors that long.
        group = dist.new_group(ranks, timeout=_COLLECTIVE_TIMEOUT) if len(ranks) > 1 else None
        if rank in ranks:
            mine = _GroupCoordinates(
                rank=ranks.index(rank), world_size=len(ranks), group=group, ranks=tuple(ranks)
            )
    return mine


def initialize_model_parallel(
    tensor_parallel_size: int = 1,
    sequence_parallel_size: int | None = None,
    cfg_parallel_size: int = 1,
) -> None:
    """Split the world into CFG, SP and TP groups (see the module docstring)."""
    global _TP, _SP, _CFG, _SP_FACTORS
    world, rank = get_world_size(), get_world_rank()
    if cfg_parallel_size not in (1, 2) or world % cfg_parallel_size:
        raise ValueError(
            f"cfg_parallel_size={cfg_parallel_size}: must be 1 or 2 and divide the world "
            f"size {world}"
        )
    sp = sequence_parallel_size or world // cfg_parallel_size
    if sp * cfg_parallel_size != world:
        raise ValueError(
            f"sp_size={sp} x cfg_parallel_size={cfg_parallel_size} must equal the number of "
            f"ranks ({world})"
        )
    if tensor_parallel_size < 1 or world % tensor_parallel_size:
        raise ValueError(f"tp_size={tensor_parallel_size} must divide the number of ranks {world}")
    _SP = _member_group([list(range(c * sp, (c + 1) * sp)) for c in range(cfg_parallel_size)], rank)
    _CFG = _member_group([list(range(s, world, sp)) for s in range(sp)], rank)
    _SP_FACTORS = _sp_factor_groups(sp, cfg_parallel_size, rank)
    tp = tensor_parallel_size
    _TP = _member_group([list(range(t * tp, (t + 1) * tp)) for t in range(world // tp)], rank)


def _sp_factor_groups(
    sp: int, cfg: int, rank: int
) -> dict[int, tuple[_GroupCoordinates, _GroupCoordinates]]:
    """Ulysses and ring sub-groups of the SP groups for every ``ulysses`` dividing ``sp``
    (the trivial factorisations reuse the SP group itself)."""
    alone = _GroupCoordinates(ranks=(rank,))
    factors = {}
    for ulysses in (u for u in range(1, sp + 1) if sp % u == 0):
        ring = sp // ulysses
        if ulysses == 1:
            factors[ulysses] = (alone, _SP)
        elif ring == 1:
            factors[ulysses] = (_SP, alone)
        else:
            bases = [c * sp for c in range(cfg)]
            factors[ulysses] = (
                _member_group(
                    [
                        [b + g * ulysses + i for i in range(ulysses)]
                        for b in bases
                        for g in range(ring)
                    ],
                    rank,
                ),
                _member_group(
                    [
                        [b + j * ulysses + i for j in range(ring)]
                        for b in bases
                        for i in range(ulysses)
                    ],
                    rank,
                ),
            )
    return factors


def destroy_model_parallel() -> None:
    global _TP, _SP, _CFG, _SP_FACTORS
    _TP, _SP, _CFG = _GroupCoordinates(), _GroupCoordinates(), _GroupCoordinates()
    _SP_FACTORS = {}
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def tensor_parallel_coordinates(rank: int, world_size: int) -> Iterator[None]:
    """Build or load layers as tensor-parallel rank ``rank`` of ``world_size``.

    No process group is created: layers built inside can load their slice of a full
    checkpoint, but a forward that needs a collective raises until a group exists.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"tensor-parallel rank must be in [0, {world_size}), got {rank}")
    saved = (_TP.rank, _TP.world_size, _TP.group, _TP.ranks)
    _TP.rank, _TP.world_size, _TP.group, _TP.ranks = (
        rank,
        world_size,
        None,
        tuple(range(world_size)),
    )
    try:
        yield
    finally:
        _TP.rank, _TP.world_size, _TP.group, _TP.ranks = saved
