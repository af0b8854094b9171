"""Tiled VAE decoding split across the ranks of a process group.

Every rank of the group calls this with the same latents and tile grid (after denoising,
every rank of a sequence-parallel group holds the full latents). Tile ``n`` is decoded by
rank ``n % world``, in rounds of ``world`` consecutive tiles: in each round every rank
decodes at most one tile, the round's tiles are exchanged with one ``all_gather`` (padded
to the largest tile's size), and every rank blends them into its own copy of the video.
All ranks blend the same tiles in the same order, so they return identical videos, equal
to a single-rank :func:`~fastvideo.models.vaes.tiling.decode_tiled`.

A round's exchange runs while the next round's tile decodes. Memory per rank: one tile's
decoder activations, two rounds of ``world`` decoded tiles, and the output video.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from fastvideo.models.vaes.tiling import Tile, TileBlender, TileGrid


def decode_tiled_across_ranks(
    decode_tile: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    grid: TileGrid,
    tile_lead_shape: tuple[int, int, int],
    group: dist.ProcessGroup,
) -> torch.Tensor:
    """Decode ``z`` (B, C, T, h, w) tile by tile, sharing the tiles among ``group``'s ranks.

    ``decode_tile`` decodes one latent tile with a fresh cache; ``tile_lead_shape`` is the
    (batch, channels, frames) of every decoded tile, which ranks without a tile in a round
    need to size their (empty) contribution. Tiles travel in ``z``'s dtype.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    padded_shape = (*tile_lead_shape, grid.max_tile_height, grid.max_tile_width)
    blender = TileBlender(grid)
    # The round in flight; holding its send buffer too keeps it alive until the exchange ends.
    pending: tuple[dist.Work, list[torch.Tensor], list[Tile], torch.Tensor] | None = None
    for start in range(0, len(grid.tiles), world):
        round_tiles = grid.tiles[start : start + world]
        mine = z.new_zeros(padded_shape)
        if rank < len(round_tiles):
            tile = round_tiles[rank]
            decoded = decode_tile(z[..., tile.latent_rows, tile.latent_cols])
            if decoded.shape != (*tile_lead_shape, tile.height, tile.width):
                raise ValueError(
                    f"tile {tile.index} decoded to {tuple(decoded.shape)}, expected "
                    f"{(*tile_lead_shape, tile.height, tile.width)}"
                )
            mine[..., : tile.height, : tile.width] = decoded
            del decoded
        gathered = [torch.empty_like(mine) for _ in range(world)]
        work = dist.all_gather(gathered, mine, group=group, async_op=True)
        if pending is not None:
            _blend_round(blender, *pending[:3])
        pending = (work, gathered, round_tiles, mine)
    if pending is not None:
        _blend_round(blender, *pending[:3])
    return blender.result()


def _blend_round(
    blender: TileBlender, work: dist.Work, gathered: list[torch.Tensor], tiles: list[Tile]
) -> None:
    work.wait()
    for tile, padded in zip(tiles, gathered, strict=False):
        blender.add(tile, padded[..., : tile.height, : tile.width])
