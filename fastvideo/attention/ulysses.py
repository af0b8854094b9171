"""Ulysses all-to-alls: trade a slice of the sequence with all heads for the whole sequence
with a slice of the heads, and back.

Each exchange is one ``all_to_all_single`` on one buffer laid out destination-major, so the
only copies are the pack before and the unpack after it (the minimum: a head slice of a
(B, S, H, D) tensor is not contiguous). Query, key and value travel together in one buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from fastvideo.distributed.parallel_state import _GroupCoordinates


def seq_to_heads(tensors: Sequence[torch.Tensor], group: _GroupCoordinates) -> torch.Tensor:
    """n tensors (B, S, H, D) -> (n, B, u*S, H/u, D) for a Ulysses group of ``u`` ranks.

    Rank i of the group receives heads ``[i*H/u, (i+1)*H/u)`` of every member's slice; the
    slices are concatenated in member order, so consecutive SP ranks' slices stay in order.
    """
    u = group.world_size
    batch, seq, heads, head_dim = tensors[0].shape
    h = heads // u
    # send[i] is what goes to member i: its heads of all n tensors.
    send = tensors[0].new_empty(u, len(tensors), batch, seq, h, head_dim)
    for index, t in enumerate(tensors):
        send[:, index].copy_(t.unflatten(2, (u, h)).permute(2, 0, 1, 3, 4))
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group.group)
    # recv[i] = member i's slice of the sequence, our heads. (u, n, B, S, h, D) -> (n, B, u*S, h, D)
    # into a fresh buffer, so each of the n tensors, and any run of them, is contiguous.
    out = recv.new_empty(len(tensors), batch, u * seq, h, head_dim)
    out.view(len(tensors), batch, u, seq, h, head_dim).copy_(recv.permute(1, 2, 0, 3, 4, 5))
    return out


def heads_to_seq(x: torch.Tensor, group: _GroupCoordinates) -> torch.Tensor:
    """(B, u*S, h, D) -> (B, S, u*h, D): back to this rank's slice with all heads."""
    u = group.world_size
    batch, full_seq, h, head_dim = x.shape
    seq = full_seq // u
    # send[i] = member i's slice of the sequence (no copy when B == 1 and x is contiguous).
    send = x.unflatten(1, (u, seq)).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group.group)
    # recv[i] = our slice, member i's heads: (u, B, S, h, D) -> (B, S, u*h, D)
    return recv.permute(1, 2, 0, 3, 4).reshape(batch, seq, u * h, head_dim)
