"""Rank function for the sliding-tile attention tests under sequence parallelism: runs on every
rank under ``fastvideo.testing.distributed.run_on_ranks`` (so it lives in an importable
module), next to ``sp_checks``.
"""

from __future__ import annotations

from typing import Any

import torch

from fastvideo.attention import DistributedAttention
from fastvideo.attention.backends.abstract import VideoGrid, _Backend
from fastvideo.attention.selector import forced_attention_backend
from fastvideo.attention.sta_mask import SlidingTileConfig
from tests.engine_checks.sp_checks import sharded_dit


def sliding_tile_sp_checks(
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    inputs: list[tuple[torch.Tensor, ...]],
    sliding_tile: SlidingTileConfig,
) -> dict[str, Any]:
    """The sliding-tile DiT's outputs on this rank's SP layout, and the error the ring path
    raises (one head over sp > 1 ranks leaves Ulysses nothing to split)."""
    with forced_attention_backend("SLIDING_TILE_ATTN", sliding_tile):
        dit = sharded_dit(config, state_dict, inputs)
        one_head = DistributedAttention(
            1, 8, supported_attention_backends=(_Backend.SLIDING_TILE_ATTN,)
        )
    local = torch.randn(1, 4, 1, 8)
    try:
        one_head(local, local, local, video_grid=VideoGrid(2, 2, 2))
        ring_error = None
    except ValueError as err:
        ring_error = str(err)
    return {"dit": dit, "ring_error": ring_error}
