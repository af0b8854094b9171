"""How a token sequence is split over the sequence-parallel (SP) ranks, and how attention over
it is split between Ulysses and ring.

Sharding: a sequence of ``N`` tokens is padded at its end to ``sp * n`` tokens,
``n = ceil(N / sp)``, and SP rank ``r`` holds the contiguous slice ``[r * n, (r + 1) * n)``.
Padding sits only at the end of the global sequence, so attention leaves it out by a key
length (``seq_len = N``), never by a mask tensor, and the result is exact.

Factorisation of the SP degree for attention: ``ulysses`` = the largest divisor of ``sp`` that
divides the head count, ``ring = sp / ulysses``. Ulysses all-to-alls trade sequence for heads
within groups of ``ulysses`` consecutive SP ranks; the ``ring`` groups that remain pass key /
value blocks around (``ring.py``). 12 heads on sp=8 -> 4 x 2; 2 heads on sp=3 -> 1 x 3.
"""

from __future__ import annotations

import functools

import torch

from fastvideo.distributed.communication_op import sequence_model_parallel_all_gather
from fastvideo.distributed.parallel_state import get_sp_rank, get_sp_world_size


@functools.cache
def sp_factorisation(sp_size: int, num_heads: int) -> tuple[int, int]:
    """(ulysses, ring) degrees with ``ulysses * ring == sp_size``: ``ulysses`` is the largest
    divisor of ``sp_size`` that also divides ``num_heads``."""
    if sp_size < 1 or num_heads < 1:
        raise ValueError(f"sp_size={sp_size} and num_heads={num_heads} must be positive")
    ulysses = max(u for u in range(1, sp_size + 1) if sp_size % u == 0 and num_heads % u == 0)
    return ulysses, sp_size // ulysses


def local_seq_len(seq_len: int, sp_size: int) -> int:
    """Tokens each SP rank holds for a global sequence of ``seq_len`` (padding included)."""
    return -(-seq_len // sp_size)


def shard_sequence(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """This SP rank's slice of ``x`` along ``dim``, zero-padded at the end of the global
    sequence so every rank holds ``ceil(N / sp)`` tokens. A view where no padding falls in
    the slice; ``x`` itself when sp is 1."""
    sp = get_sp_world_size()
    if sp == 1:
        return x
    total = x.shape[dim]
    n = local_seq_len(total, sp)
    start = min(get_sp_rank() * n, total)
    part = x.narrow(dim, start, min(n, total - start))
    if part.shape[dim] == n:
        return part
    pad_shape = list(x.shape)
    pad_shape[dim] = n - part.shape[dim]
    return torch.cat([part, part.new_zeros(pad_shape)], dim=dim)


def gather_sequence(x: torch.Tensor, seq_len: int, dim: int = 1) -> torch.Tensor:
    """Inverse of ``shard_sequence``: the full sequence of ``seq_len`` tokens on every rank."""
    if get_sp_world_size() == 1:
        return x
    return sequence_model_parallel_all_gather(x, dim=dim).narrow(dim, 0, seq_len)
