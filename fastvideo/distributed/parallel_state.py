"""Where this process sits in the tensor- and sequence-parallel layout.

Until process groups are initialised (the distributed runtime), every degree is 1 and every
rank is 0, which is the single-process engine. ``tensor_parallel_coordinates`` lets a caller
pretend to be rank ``r`` of ``n`` without a process group: that is how a checkpoint is sliced
offline and how the weight loaders are unit-tested on one process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch.distributed as dist


@dataclass
class _GroupCoordinates:
    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None


_TP = _GroupCoordinates()
_SP = _GroupCoordinates()


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


@contextlib.contextmanager
def tensor_parallel_coordinates(rank: int, world_size: int) -> Iterator[None]:
    """Build or load layers as tensor-parallel rank ``rank`` of ``world_size``.

    No process group is created: layers built inside can load their slice of a full
    checkpoint, but a forward that needs a collective raises until a group exists.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"tensor-parallel rank must be in [0, {world_size}), got {rank}")
    saved = (_TP.rank, _TP.world_size, _TP.group)
    _TP.rank, _TP.world_size, _TP.group = rank, world_size, None
    try:
        yield
    finally:
        _TP.rank, _TP.world_size, _TP.group = saved
