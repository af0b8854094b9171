"""Sliding-tile attention (STA): the token layout and the FlexAttention block mask.

The pattern. The latent video's ``T x H x W`` tokens are cut into tiles of ``tile = (tt, th,
tw)`` tokens (6x8x8 by default); tiles at the far border of an axis are partial when the grid
is not a multiple of the tile. A query in tile ``(i, j, k)`` attends to exactly the keys of
the tiles ``(i', j', k')`` with ``|i - i'| <= (wt - 1) / 2`` (and alike for ``j``, ``k``),
``window = (wt, wh, ww)`` counted in tiles and odd; the window is clipped at the borders, not
shifted, so a border tile sees fewer tiles. Optional ``extra_tokens`` (e.g. text) appended
after the video tokens are global: every query attends to them and they attend to every token.

The layout. Before attention the tokens are reordered tile-major (tiles in (t, h, w)
row-major order, the tokens of one tile contiguous and row-major inside it), and each tile is
zero-padded up to a multiple of the FlexAttention block size (128 by default); the extra
tokens follow, padded alike. So no block ever mixes two tiles, or a tile and the extra tokens:
every (query block, key block) pair is either skipped or fully allowed, except where the key
block holds padding slots, which ``mask_mod`` masks out -- the only partially-masked blocks
are the last block of a tile whose size is not a multiple of the block size. A 6x8x8 tile is
384 = 3 x 128 tokens: no padding and no partial blocks inside the grid. Padding costs compute
only at the borders; choosing tiles that divide the grid avoids it. Padded query slots are
computed and thrown away. The result is exact: the mask never depends on approximations.

The block mask is built directly from the tile adjacency (``BlockMask.from_kv_blocks``),
never by evaluating ``mask_mod`` over all ``L x L`` token pairs, and cached per (grid, extra
tokens, tile, window, block size, device): each layer and step at one resolution reuses it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask

Triple = tuple[int, int, int]

# What a slot of the padded tile-major sequence holds.
_VIDEO, _EXTRA, _PAD = 0, 1, 2


def _triple(value: object, name: str, odd: bool = False) -> Triple:
    items = tuple(value) if isinstance(value, (list, tuple)) else ()
    ok = len(items) == 3 and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 and (v % 2 or not odd)
        for v in items
    )
    if not ok:
        kind = "odd positive ints" if odd else "positive ints"
        raise ValueError(f"{name}={value!r} must be three {kind} (t, h, w)")
    return items  # type: ignore[return-value]


@dataclass(frozen=True)
class SlidingTileConfig:
    """Tile size in latent tokens, window in tiles (odd, centred on the query's tile), and
    the FlexAttention block size every tile is padded to a multiple of."""

    tile: Triple = (6, 8, 8)
    window: Triple = (3, 3, 3)
    block_size: int = 128

    def __post_init__(self) -> None:
        # Lists (a config read back from JSON) become tuples, so equal configs hash alike.
        object.__setattr__(self, "tile", _triple(self.tile, "sta_tile"))
        object.__setattr__(self, "window", _triple(self.window, "sta_window", odd=True))
        size = self.block_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"block_size={size!r} must be a positive int")

    @property
    def radius(self) -> Triple:
        """Tiles reached on each side of the query's tile, per axis."""
        return tuple((w - 1) // 2 for w in self.window)  # type: ignore[return-value]


@dataclass(frozen=True)
class TileLayout:
    """The padded tile-major sequence of one (grid, extra tokens, config), on the CPU.

    ``L`` slots in all: each tile padded to a multiple of the block size, then the extra
    tokens likewise. ``slot_of_token[n]`` is where token ``n`` (row-major video tokens, then
    extra tokens) goes; ``token_of_slot[s]`` reads it back (padding slots read token 0, and
    are masked as keys). ``allowed`` / ``partial`` are (blocks x blocks): which key blocks a
    query block computes, and which of those need ``mask_mod`` (they hold padding).
    """

    num_tokens: int
    num_slots: int
    slot_of_token: torch.Tensor  # (num_tokens,) int64
    token_of_slot: torch.Tensor  # (L,) int64
    slot_tile: torch.Tensor  # (L, 3) int32: the tile coordinates of the slot's tile
    slot_kind: torch.Tensor  # (L,) int8: _VIDEO, _EXTRA or _PAD
    allowed: torch.Tensor  # (L / block, L / block) bool
    partial: torch.Tensor  # (L / block, L / block) bool, a subset of allowed

    @property
    def block_sparsity(self) -> float:
        """Fraction of (query block, key block) pairs the kernel skips."""
        return 1.0 - self.allowed.sum().item() / self.allowed.numel()

    @property
    def computed_blocks(self) -> int:
        return int(self.allowed.sum())

    @property
    def partial_block_fraction(self) -> float:
        """Fraction of the computed block pairs that are only partially allowed."""
        return self.partial.sum().item() / max(self.allowed.sum().item(), 1)

    @property
    def padding_fraction(self) -> float:
        """Fraction of the slots that are padding."""
        return 1.0 - self.num_tokens / self.num_slots


def _axis_tiles(size: int, tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Along one axis: each position's tile and offset in it, and each tile's extent."""
    pos = torch.arange(size)
    num_tiles = -(-size // tile)
    extent = (size - torch.arange(num_tiles) * tile).clamp(max=tile)
    return pos // tile, pos % tile, extent


@functools.lru_cache(maxsize=32)
def tile_layout(grid: Triple, extra_tokens: int, config: SlidingTileConfig) -> TileLayout:
    """Build (and cache) the padded tile-major layout of a ``grid`` of video tokens plus
    ``extra_tokens`` global tokens appended after them."""
    grid = _triple(grid, "grid")
    if isinstance(extra_tokens, bool) or not isinstance(extra_tokens, int) or extra_tokens < 0:
        raise ValueError(f"extra_tokens={extra_tokens!r} must be a non-negative int")
    block = config.block_size
    (tt, lt, et), (th, lh, eh), (tw, lw, ew) = (
        _axis_tiles(n, t) for n, t in zip(grid, config.tile, strict=True)
    )
    num_tiles = (len(et), len(eh), len(ew))

    # Per video token (row-major t, h, w): its tile id and its row-major rank inside the tile.
    tile_id = (tt[:, None, None] * num_tiles[1] + th[None, :, None]) * num_tiles[2] + tw
    ext_h, ext_w = eh[th][None, :, None], ew[tw][None, None, :]
    rank = (lt[:, None, None] * ext_h + lh[None, :, None]) * ext_w + lw[None, None, :]

    tile_size = (et[:, None, None] * eh[None, :, None] * ew[None, None, :]).flatten()
    padded = -(-tile_size // block) * block
    offset = torch.cumsum(padded, 0) - padded
    video_slots = int(padded.sum())
    slot_of_video = (offset[tile_id] + rank).flatten()

    extra_slots = -(-extra_tokens // block) * block
    num_slots = video_slots + extra_slots
    slot_of_token = torch.cat([slot_of_video, video_slots + torch.arange(extra_tokens)])
    num_tokens = slot_of_token.numel()
    token_of_slot = torch.zeros(num_slots, dtype=torch.long)
    token_of_slot[slot_of_token] = torch.arange(num_tokens)

    slot_kind = torch.full((num_slots,), _PAD, dtype=torch.int8)
    slot_kind[slot_of_video] = _VIDEO
    slot_kind[video_slots : video_slots + extra_tokens] = _EXTRA
    coords = torch.stack(
        torch.meshgrid(*(torch.arange(n) for n in num_tiles), indexing="ij"), dim=-1
    ).reshape(-1, 3)
    slot_tile = torch.cat(
        [coords.repeat_interleave(padded, dim=0), torch.zeros(extra_slots, 3, dtype=coords.dtype)]
    ).to(torch.int32)

    # Block level: no block straddles two tiles, so a block's first slot names its tile.
    kind_blocks = slot_kind.view(-1, block)
    block_tile = slot_tile[::block]
    block_extra = kind_blocks[:, 0] == _EXTRA
    block_has_pad = (kind_blocks == _PAD).any(dim=1)
    radius = torch.tensor(config.radius, dtype=torch.int32)
    near = ((block_tile[:, None, :] - block_tile[None, :, :]).abs() <= radius).all(dim=-1)
    allowed = near | block_extra[:, None] | block_extra[None, :]
    partial = allowed & block_has_pad[None, :]
    return TileLayout(
        num_tokens=num_tokens,
        num_slots=num_slots,
        slot_of_token=slot_of_token,
        token_of_slot=token_of_slot,
        slot_tile=slot_tile,
        slot_kind=slot_kind,
        allowed=allowed,
        partial=partial,
    )


def _mask_mod(slot_tile: torch.Tensor, slot_kind: torch.Tensor, radius: Triple):
    """The token-level rule over slots; FlexAttention evaluates it on partial blocks only."""
    # Separate contiguous columns: compiled kernels want plain captured buffers.
    tile_t, tile_h, tile_w = (column.contiguous() for column in slot_tile.unbind(dim=1))
    rt, rh, rw = radius

    def sliding_tile_mask(b, h, q_idx, kv_idx):
        near = (
            ((tile_t[q_idx] - tile_t[kv_idx]).abs() <= rt)
            & ((tile_h[q_idx] - tile_h[kv_idx]).abs() <= rh)
            & ((tile_w[q_idx] - tile_w[kv_idx]).abs() <= rw)
        )
        extra = (slot_kind[q_idx] == _EXTRA) | (slot_kind[kv_idx] == _EXTRA)
        return (slot_kind[kv_idx] != _PAD) & (near | extra)

    return sliding_tile_mask


def _block_lists(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) bool -> per-row counts and column indices (selected columns first), the
    ``kv_num_blocks`` / ``kv_indices`` pair of a BlockMask, with batch and head dims of 1."""
    counts = blocks.sum(dim=1, dtype=torch.int32)
    indices = torch.argsort((~blocks).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return counts[None, None], indices[None, None]


@dataclass(frozen=True)
class StaPlan:
    """What one forward at one resolution needs on its device: the gathers into and out of
    the padded tile-major order, and the block mask over it."""

    layout: TileLayout
    token_of_slot: torch.Tensor
    slot_of_token: torch.Tensor
    block_mask: BlockMask

    def to_tile_major(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, H, D) tokens in model order -> (B, H, L, D) padded tile-major slots."""
        return x.index_select(1, self.token_of_slot).transpose(1, 2)

    def from_tile_major(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, L, D) slots -> (B, N, H, D) tokens in model order, padding dropped."""
        return x.transpose(1, 2).index_select(1, self.slot_of_token)


@functools.lru_cache(maxsize=32)
def sta_plan(
    grid: Triple, extra_tokens: int, config: SlidingTileConfig, device: torch.device
) -> StaPlan:
    """Build (and cache: it costs far more than a kernel launch) the layout and block mask of
    one (grid, extra tokens, tile, window, block size, device)."""
    layout = tile_layout(grid, extra_tokens, config)
    full = layout.allowed & ~layout.partial
    kv_num, kv_idx = _block_lists(layout.partial)
    full_num, full_idx = _block_lists(full)
    block_mask = BlockMask.from_kv_blocks(
        kv_num.to(device),
        kv_idx.to(device),
        full_num.to(device),
        full_idx.to(device),
        BLOCK_SIZE=config.block_size,
        mask_mod=_mask_mod(layout.slot_tile.to(device), layout.slot_kind.to(device), config.radius),
        seq_lengths=(layout.num_slots, layout.num_slots),
    )
    return StaPlan(
        layout=layout,
        token_of_slot=layout.token_of_slot.to(device),
        slot_of_token=layout.slot_of_token.to(device),
        block_mask=block_mask,
    )


def sta_block_sparsity(
    grid: Triple,
    tile: Triple = (6, 8, 8),
    window: Triple = (3, 3, 3),
    extra_tokens: int = 0,
    block_size: int = 128,
) -> float:
    """Fraction of FlexAttention blocks sliding-tile attention skips at this shape (what a
    benchmark prints next to its timing). Dense attention over the unpadded tokens would
    compute about ``(N / block)**2`` blocks; STA computes ``TileLayout.computed_blocks``,
    ``(1 - this) x (L / block)**2`` over the padded length ``L``."""
    config = SlidingTileConfig(tile, window, block_size)
    return tile_layout(tuple(grid), extra_tokens, config).block_sparsity
