"""Spatially tiled VAE decoding: the tile grid, and the blending of overlapping tiles.

The grid and the blend are diffusers' ``AutoencoderKLWan.tiled_decode``, so results match
it: tiles of ``min`` latent pixels start every ``stride`` latent pixels (the last ones
may be cut short by the frame edge); each decoded tile is cross-faded linearly with the
tile above it over ``blend_height = sample_min_height - sample_stride_height`` rows, then
with the tile to its left over ``blend_width`` columns; and the top-left
``stride x stride`` block of every tile is kept. Each tile decodes alone, with its own
causal cache, over all frames.

Unlike diffusers, which holds every decoded tile until the end (about
``(min / stride)^2`` times the video), tiles are blended into a preallocated output as
they arrive in raster order. Only the overlap strips a later tile still blends with are
kept: the bottom rows of the previous tile row and the right columns of the previous tile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TileConfig:
    """Tile size and stride in sample (video) pixels, as in diffusers' ``enable_tiling``.

    Defaults are diffusers' (256 px tiles every 192 px, blended over 64 px). Every value
    must be a multiple of the VAE's spatial compression, and a stride at most its tile
    size: diffusers accepts other values but then shifts tiles against each other.
    """

    sample_min_height: int = 256
    sample_min_width: int = 256
    sample_stride_height: int = 192
    sample_stride_width: int = 192

    def check(self, spatial_ratio: int) -> None:
        for name in (
            "sample_min_height",
            "sample_min_width",
            "sample_stride_height",
            "sample_stride_width",
        ):
            value = getattr(self, name)
            if value <= 0 or value % spatial_ratio:
                raise ValueError(
                    f"tile_{name}={value}: must be a positive multiple of the VAE's spatial "
                    f"compression ({spatial_ratio})"
                )
        for axis in ("height", "width"):
            size = getattr(self, f"sample_min_{axis}")
            stride = getattr(self, f"sample_stride_{axis}")
            if stride > size:
                raise ValueError(
                    f"tile_sample_stride_{axis}={stride} exceeds tile_sample_min_{axis}={size}:"
                    " tiles would leave gaps"
                )


@dataclass(frozen=True)
class Tile:
    """One tile: where it reads the latent and where its kept block lands in the video."""

    index: int  # raster order: row-major over the grid
    row: int
    col: int
    latent_rows: slice
    latent_cols: slice
    top: int  # sample pixel of the tile's first row/column
    left: int
    height: int  # decoded size in sample pixels
    width: int


class TileGrid:
    """The tiles of an (h, w) latent frame for ``config``, for a VAE that upsamples
    ``spatial_ratio`` times."""

    def __init__(
        self, latent_height: int, latent_width: int, config: TileConfig, spatial_ratio: int
    ) -> None:
        config.check(spatial_ratio)
        self.spatial_ratio = spatial_ratio
        self.sample_height = latent_height * spatial_ratio
        self.sample_width = latent_width * spatial_ratio
        self.stride_height = config.sample_stride_height
        self.stride_width = config.sample_stride_width
        self.blend_height = config.sample_min_height - config.sample_stride_height
        self.blend_width = config.sample_min_width - config.sample_stride_width
        min_h = config.sample_min_height // spatial_ratio
        min_w = config.sample_min_width // spatial_ratio
        # diffusers tiles only when the frame is larger than one tile.
        self.is_tiled = latent_height > min_h or latent_width > min_w
        row_starts = range(0, latent_height, config.sample_stride_height // spatial_ratio)
        col_starts = range(0, latent_width, config.sample_stride_width // spatial_ratio)
        self.rows, self.cols = len(row_starts), len(col_starts)
        self.tiles: list[Tile] = []
        for r, i in enumerate(row_starts):
            for c, j in enumerate(col_starts):
                rows = slice(i, min(i + min_h, latent_height))
                cols = slice(j, min(j + min_w, latent_width))
                self.tiles.append(
                    Tile(
                        index=len(self.tiles),
                        row=r,
                        col=c,
                        latent_rows=rows,
                        latent_cols=cols,
                        top=i * spatial_ratio,
                        left=j * spatial_ratio,
                        height=(rows.stop - rows.start) * spatial_ratio,
                        width=(cols.stop - cols.start) * spatial_ratio,
                    )
                )
        # The first tile is never cut short more than any other.
        self.max_tile_height = self.tiles[0].height
        self.max_tile_width = self.tiles[0].width


class TileBlender:
    """Blends decoded tiles, fed in raster order, into the full video."""

    def __init__(self, grid: TileGrid) -> None:
        self.grid = grid
        self.video: torch.Tensor | None = None
        self._next = 0
        self._bottom_strips: dict[int, torch.Tensor] = {}  # col -> previous row's tile bottom
        self._right_strip: torch.Tensor | None = None  # the previous tile's right columns

    def add(self, tile: Tile, decoded: torch.Tensor) -> None:
        """Blend ``decoded`` (B, C, T, tile.height, tile.width) in; it is modified in place."""
        grid = self.grid
        if tile.index != self._next:
            raise ValueError(f"tile {tile.index} fed out of order; expected {self._next}")
        if decoded.shape[-2:] != (tile.height, tile.width):
            raise ValueError(
                f"tile {tile.index} decoded to {tuple(decoded.shape[-2:])}, "
                f"expected {(tile.height, tile.width)}"
            )
        self._next += 1
        if self.video is None:
            b, c, t = decoded.shape[:3]
            self.video = decoded.new_empty(b, c, t, grid.sample_height, grid.sample_width)

        if tile.row > 0:
            above = self._bottom_strips[tile.col]
            n = min(above.shape[-2], tile.height, grid.blend_height)
            if n > 0:
                decoded[..., :n, :] = _crossfade(above[..., -n:, :], decoded[..., :n, :], dim=-2)
        if tile.col > 0:
            left = self._right_strip
            n = min(left.shape[-1], tile.width, grid.blend_width)
            if n > 0:
                decoded[..., :n] = _crossfade(left[..., -n:], decoded[..., :n], dim=-1)

        # Keep only what later tiles blend with; clones so the tile itself can be freed.
        if tile.row + 1 < grid.rows:
            n = min(tile.height, grid.blend_height)
            self._bottom_strips[tile.col] = decoded[..., tile.height - n :, :].clone()
        if tile.col + 1 < grid.cols:
            n = min(tile.width, grid.blend_width)
            self._right_strip = decoded[..., tile.width - n :].clone()

        kept = decoded[..., : grid.stride_height, : grid.stride_width]
        h, w = kept.shape[-2:]
        self.video[..., tile.top : tile.top + h, tile.left : tile.left + w] = kept

    def result(self) -> torch.Tensor:
        if self.video is None or self._next != len(self.grid.tiles):
            raise RuntimeError(f"only {self._next} of {len(self.grid.tiles)} tiles were added")
        return self.video


def _crossfade(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """``a * (1 - k / n) + b * (k / n)`` at position k of n along ``dim``: diffusers'
    ``blend_v``/``blend_h``, with the weights computed in float64 as Python does there."""
    n = b.shape[dim]
    shape = [1] * b.ndim
    shape[dim] = n
    ramp = (torch.arange(n, dtype=torch.float64) / n).view(shape)
    # Half-precision weights would not sum to 1; blend in fp32 and round once.
    compute = torch.promote_types(b.dtype, torch.float32)
    w_b = ramp.to(b.device, compute)
    w_a = (1 - ramp).to(b.device, compute)
    return (a.to(compute) * w_a + b.to(compute) * w_b).to(b.dtype)


def decode_tiled(
    decode_tile: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, grid: TileGrid
) -> torch.Tensor:
    """Decode ``z`` (B, C, T, h, w) tile by tile on this rank; ``decode_tile`` decodes one
    latent tile over all frames with a fresh cache."""
    blender = TileBlender(grid)
    for tile in grid.tiles:
        blender.add(tile, decode_tile(z[..., tile.latent_rows, tile.latent_cols]))
    return blender.result()
