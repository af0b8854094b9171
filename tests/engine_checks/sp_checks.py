"""Rank functions for the sequence-parallel tests: each runs on every rank under
``fastvideo.testing.distributed.run_on_ranks`` (they must live in an importable module) and
returns, per case, what this rank's sharded computation gathered back to the full sequence.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fastvideo.attention import DistributedAttention
from fastvideo.attention.backends.abstract import _Backend
from fastvideo.attention.sequence_parallel import gather_sequence, shard_sequence
from fastvideo.distributed.parallel_state import (
    get_sp_ulysses_ring_groups,
    get_sp_world_size,
)

# (batch, tokens, heads, head_dim)
AttentionCase = tuple[int, int, int, int]
# (DiT constructor config, its state_dict, forward argument tuples to run)
DiTCase = tuple[dict[str, Any], dict[str, torch.Tensor], list[tuple[Any, ...]]]


def attention_inputs(case: AttentionCase, seed: int = 0) -> tuple[torch.Tensor, ...]:
    batch, tokens, heads, head_dim = case
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, tokens, heads, head_dim, generator=gen) for _ in range(3))


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain SDPA over the whole (B, S, H, D) sequence on one process."""
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def sharded_attention(cases: list[AttentionCase]) -> list[torch.Tensor]:
    """Each case: shard q/k/v like the DiT does, run DistributedAttention, gather back."""
    results = []
    for case in cases:
        q, k, v = attention_inputs(case)
        tokens, heads, head_dim = case[1:]
        attn = DistributedAttention(
            heads, head_dim, supported_attention_backends=(_Backend.TORCH_SDPA,)
        )
        local = attn(*(shard_sequence(t) for t in (q, k, v)), seq_len=tokens)
        assert local.shape[1] == -(-tokens // get_sp_world_size())
        results.append(gather_sequence(local, tokens))
    return results


def sharded_dit(
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    inputs: list[tuple[torch.Tensor, ...]],
) -> list[torch.Tensor]:
    """Build the DiT from ``config``, load ``state_dict``, run each input tuple under SP."""
    from fastvideo.models.dits.wanvideo import WanTransformer3DModel

    model = WanTransformer3DModel(**config).eval()
    model.load_state_dict(state_dict)
    with torch.no_grad():
        return [model(*args) for args in inputs]


def sub_group_layout() -> dict[int, tuple[tuple[int, ...], tuple[int, ...]]]:
    """ulysses degree -> global ranks of this rank's (Ulysses, ring) groups."""
    sp = get_sp_world_size()
    layout = {}
    for ulysses in (u for u in range(1, sp + 1) if sp % u == 0):
        ulysses_group, ring_group = get_sp_ulysses_ring_groups(ulysses)
        layout[ulysses] = (ulysses_group.ranks, ring_group.ranks)
    return layout


def sequence_parallel_checks(
    attention_cases: list[AttentionCase], dit_cases: list[DiTCase]
) -> dict[str, Any]:
    """Everything one test session needs from one SP layout, in one spawn of the ranks."""
    return {
        "attention": sharded_attention(attention_cases),
        "dit": [sharded_dit(*case) for case in dit_cases],
        "groups": sub_group_layout(),
    }
