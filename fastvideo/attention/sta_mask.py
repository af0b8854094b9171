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
zero-padded up to a multiple of the FlexAttention block size (64 by default, query and key
sides each their own); the extra tokens follow, padded alike. So no block ever mixes two
tiles, or a tile and the extra tokens: every (query block, key block) pair is either skipped
or fully allowed, except where the key block holds padding slots, which ``mask_mod`` masks
out -- the only partially-masked blocks are the last key block of a tile whose size is not a
multiple of the key block size. A 6x8x8 tile is 384 = 6 x 64 tokens: no padding and no
partial blocks inside the grid. Padding costs compute only at the borders; choosing tiles
that divide the grid avoids it. Padded query slots are computed and thrown away. The result
is exact: the mask never depends on approximations.

The block mask is built directly from the tile adjacency (``BlockMask.from_kv_blocks``),
never by evaluating ``mask_mod`` over all ``L x L`` token pairs, and cached per (grid, extra
tokens, tile, window, block sizes, device): each layer and step at one resolution reuses it.
Its ``mask_mod`` is the whole rule; on CUDA the plan also holds a copy whose ``mask_mod`` is
only the padding-key test, all a partial block needs, for the compiled block-sparse kernel
(FlexAttention's eager path evaluates ``mask_mod`` on every pair: it gets the whole rule).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask

from fastvideo.layers.fused_ops import TokenRows

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
    """Tile size in latent tokens, window in tiles (odd, centred on the query's tile), and the
    FlexAttention block sizes every tile is padded to a multiple of: ``block_size`` on the
    query side, ``kv_block_size`` on the key side (default ``min(block_size, 64)``).

    Why 64 and not FlexAttention's 128: a block must sit in one tile (a query block shares
    one window), so border tiles are padded to the block size; at the 1.3B grid (21x30x52
    tokens, 6x8x8 tiles, window 3) blocks of 128 compute 21.4% of dense attention's work with
    15% of the computed blocks partially masked, blocks of 64 18.5% with 4% (the exact
    pattern is 17.7%). Measured on an H100: 2.98 ms per call vs 3.41 (bench/sta_kernel.py)."""

    tile: Triple = (6, 8, 8)
    window: Triple = (3, 3, 3)
    block_size: int = 64
    kv_block_size: int | None = None

    def __post_init__(self) -> None:
        # Lists (a config read back from JSON) become tuples, so equal configs hash alike.
        object.__setattr__(self, "tile", _triple(self.tile, "sta_tile"))
        object.__setattr__(self, "window", _triple(self.window, "sta_window", odd=True))
        if self.kv_block_size is None:
            object.__setattr__(self, "kv_block_size", min(self.block_size, 64))
        for name in ("block_size", "kv_block_size"):
            size = getattr(self, name)
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{name}={size!r} must be a positive int")

    @property
    def radius(self) -> Triple:
        """Tiles reached on each side of the query's tile, per axis."""
        return tuple((w - 1) // 2 for w in self.window)  # type: ignore[return-value]


_forced_config: SlidingTileConfig | None = None


@contextlib.contextmanager
def forced_sliding_tile_config(config: SlidingTileConfig | None) -> Iterator[None]:
    """Sliding-tile layers constructed inside take ``config`` (``None``: the defaults).
    ``selector.forced_attention_backend`` sets it with the backend, for one model build."""
    global _forced_config
    saved, _forced_config = _forced_config, config
    try:
        yield
    finally:
        _forced_config = saved


def sliding_tile_config() -> SlidingTileConfig:
    """Tile, window and block size for a sliding-tile layer constructed now."""
    return _forced_config or SlidingTileConfig()


@dataclass(frozen=True)
class SlotLayout:
    """One side's (queries' or keys') padded tile-major sequence, on the CPU.

    ``num_slots`` in all: each tile padded to a multiple of ``block_size``, then the extra
    tokens likewise. ``slot_of_token[n]`` is where token ``n`` (row-major video tokens, then
    extra tokens) goes; ``token_of_slot[s]`` reads it back (padding slots read token 0).
    """

    block_size: int
    num_tokens: int
    num_slots: int
    slot_of_token: torch.Tensor  # (num_tokens,) int64
    token_of_slot: torch.Tensor  # (num_slots,) int64
    slot_tile: torch.Tensor  # (num_slots, 3) int32: the tile coordinates of the slot's tile
    slot_kind: torch.Tensor  # (num_slots,) int8: _VIDEO, _EXTRA or _PAD

    @property
    def num_blocks(self) -> int:
        return self.num_slots // self.block_size

    @property
    def block_tile(self) -> torch.Tensor:
        """(blocks, 3): no block straddles two tiles, so a block's first slot names its tile."""
        return self.slot_tile[:: self.block_size]

    @property
    def block_extra(self) -> torch.Tensor:
        return self.slot_kind[:: self.block_size] == _EXTRA

    @property
    def block_has_pad(self) -> torch.Tensor:
        return (self.slot_kind.view(-1, self.block_size) == _PAD).any(dim=1)


@dataclass(frozen=True)
class TileLayout:
    """Both sides' slot layouts and, over (query blocks x key blocks), which pairs a
    block-sparse kernel computes (``allowed``) and which of those hold padding keys that must
    be masked token by token (``partial``)."""

    query: SlotLayout
    key: SlotLayout
    allowed: torch.Tensor  # (query blocks, key blocks) bool
    partial: torch.Tensor  # (query blocks, key blocks) bool, a subset of allowed

    @property
    def num_tokens(self) -> int:
        return self.query.num_tokens

    @property
    def block_sparsity(self) -> float:
        """Fraction of (query block, key block) pairs the kernel skips."""
        return 1.0 - self.allowed.sum().item() / self.allowed.numel()

    @property
    def computed_blocks(self) -> int:
        return int(self.allowed.sum())

    @property
    def dense_work_fraction(self) -> float:
        """Query-key pairs computed (padding included) over dense attention's ``N x N``."""
        pairs = self.computed_blocks * self.query.block_size * self.key.block_size
        return pairs / self.num_tokens**2

    @property
    def partial_block_fraction(self) -> float:
        """Fraction of the computed block pairs that are only partially allowed."""
        return self.partial.sum().item() / max(self.allowed.sum().item(), 1)


def _axis_tiles(size: int, tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Along one axis: each position's tile and offset in it, and each tile's extent."""
    pos = torch.arange(size)
    num_tiles = -(-size // tile)
    extent = (size - torch.arange(num_tiles) * tile).clamp(max=tile)
    return pos // tile, pos % tile, extent


def slot_layout(grid: Triple, extra_tokens: int, tile: Triple, block: int) -> SlotLayout:
    """The padded tile-major sequence of a ``grid`` of video tokens in ``tile``s, plus
    ``extra_tokens`` global tokens after them, every tile padded to a multiple of ``block``."""
    (tt, lt, et), (th, lh, eh), (tw, lw, ew) = (
        _axis_tiles(n, t) for n, t in zip(grid, tile, strict=True)
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
    return SlotLayout(
        block_size=block,
        num_tokens=num_tokens,
        num_slots=num_slots,
        slot_of_token=slot_of_token,
        token_of_slot=token_of_slot,
        slot_tile=slot_tile,
        slot_kind=slot_kind,
    )


@functools.lru_cache(maxsize=32)
def tile_layout(grid: Triple, extra_tokens: int, config: SlidingTileConfig) -> TileLayout:
    """Build (and cache) both sides' layouts and the block-level pattern."""
    grid = _triple(grid, "grid")
    if isinstance(extra_tokens, bool) or not isinstance(extra_tokens, int) or extra_tokens < 0:
        raise ValueError(f"extra_tokens={extra_tokens!r} must be a non-negative int")
    query = slot_layout(grid, extra_tokens, config.tile, config.block_size)
    key = slot_layout(grid, extra_tokens, config.tile, config.kv_block_size)
    radius = torch.tensor(config.radius, dtype=torch.int32)
    near = ((query.block_tile[:, None, :] - key.block_tile[None, :, :]).abs() <= radius).all(-1)
    allowed = near | query.block_extra[:, None] | key.block_extra[None, :]
    partial = allowed & key.block_has_pad[None, :]
    return TileLayout(query=query, key=key, allowed=allowed, partial=partial)


def _mask_mod(query: SlotLayout, key: SlotLayout, radius: Triple):
    """The whole token-level rule over (query slot, key slot): what FlexAttention's unfused
    path (off CUDA) evaluates over every pair."""
    # Separate contiguous columns: compiled kernels want plain captured buffers.
    q_t, q_h, q_w = (column.contiguous() for column in query.slot_tile.unbind(dim=1))
    k_t, k_h, k_w = (column.contiguous() for column in key.slot_tile.unbind(dim=1))
    q_kind, k_kind = query.slot_kind, key.slot_kind
    rt, rh, rw = radius

    def sliding_tile_mask(b, h, q_idx, kv_idx):
        near = (
            ((q_t[q_idx] - k_t[kv_idx]).abs() <= rt)
            & ((q_h[q_idx] - k_h[kv_idx]).abs() <= rh)
            & ((q_w[q_idx] - k_w[kv_idx]).abs() <= rw)
        )
        extra = (q_kind[q_idx] == _EXTRA) | (k_kind[kv_idx] == _EXTRA)
        return (k_kind[kv_idx] != _PAD) & (near | extra)

    return sliding_tile_mask


def _padding_key_mask_mod(key: SlotLayout):
    """What the rule reduces to on a partial block: no block mixes two tiles, or a tile and
    the extra tokens, so inside an allowed block pair only padding keys are masked. The
    block-sparse kernel evaluates mask_mod on partial blocks only; one gather per key is
    cheaper there than the whole rule's eight."""
    key_is_real = (key.slot_kind != _PAD).contiguous()

    def padding_key_mask(b, h, q_idx, kv_idx):
        return key_is_real[kv_idx]

    return padding_key_mask


def _block_lists(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) bool -> per-row counts and column indices (selected columns first), the
    ``kv_num_blocks`` / ``kv_indices`` pair of a BlockMask, with batch and head dims of 1."""
    counts = blocks.sum(dim=1, dtype=torch.int32)
    indices = torch.argsort((~blocks).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return counts[None, None], indices[None, None]


@dataclass(frozen=True)
class StaPlan:
    """What one forward at one resolution needs on its device: the gathers into and out of
    the padded tile-major orders, and the block mask over them. ``query_rows`` /
    ``key_rows`` place tokens in those orders for a producer that writes them there itself
    (``fused_ops.rms_norm_rotary``); ``key_token_of_slot`` gathers values alike."""

    layout: TileLayout
    query_token_of_slot: torch.Tensor
    key_token_of_slot: torch.Tensor
    query_slot_of_token: torch.Tensor
    # The whole rule: right for any FlexAttention path, including its eager one, which
    # evaluates mask_mod on every pair and ignores the block lists.
    block_mask: BlockMask
    # Only for the compiled block-sparse kernel, which evaluates mask_mod on partial blocks
    # alone: there the padding-key test is the whole rule (on CUDA; elsewhere the same mask).
    sparse_kernel_block_mask: BlockMask
    query_rows: TokenRows
    key_rows: TokenRows

    def queries_to_tile_major(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, H, D) queries in model order -> (B, H, Lq, D) padded tile-major slots."""
        return x.index_select(1, self.query_token_of_slot).transpose(1, 2)

    def keys_to_tile_major(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, H, D) keys or values in model order -> (B, H, Lkv, D) slots."""
        return x.index_select(1, self.key_token_of_slot).transpose(1, 2)

    def from_tile_major(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, Lq, D) query slots -> (B, N, H, D) tokens in model order, padding dropped."""
        return x.transpose(1, 2).index_select(1, self.query_slot_of_token)


@functools.lru_cache(maxsize=32)
def sta_plan(
    grid: Triple, extra_tokens: int, config: SlidingTileConfig, device: torch.device
) -> StaPlan:
    """Build (and cache: it costs far more than a kernel launch) the layout and block mask of
    one (grid, extra tokens, tile, window, block sizes, device)."""
    layout = tile_layout(grid, extra_tokens, config)
    query, key = layout.query, layout.key
    full = layout.allowed & ~layout.partial
    kv_num, kv_idx = _block_lists(layout.partial)
    full_num, full_idx = _block_lists(full)
    lists = [t.to(device) for t in (kv_num, kv_idx, full_num, full_idx)]

    def block_mask(mask_mod) -> BlockMask:
        return BlockMask.from_kv_blocks(
            *lists,
            BLOCK_SIZE=(query.block_size, key.block_size),
            mask_mod=mask_mod,
            seq_lengths=(query.num_slots, key.num_slots),
        )

    whole_rule = block_mask(
        _mask_mod(_to_device(query, device), _to_device(key, device), config.radius)
    )
    return StaPlan(
        layout=layout,
        query_token_of_slot=query.token_of_slot.to(device),
        key_token_of_slot=key.token_of_slot.to(device),
        query_slot_of_token=query.slot_of_token.to(device),
        block_mask=whole_rule,
        sparse_kernel_block_mask=(
            block_mask(_padding_key_mask_mod(_to_device(key, device)))
            if device.type == "cuda"
            else whole_rule
        ),
        query_rows=_token_rows(query, device),
        key_rows=_token_rows(key, device),
    )


def _token_rows(side: SlotLayout, device: torch.device) -> TokenRows:
    padding = torch.nonzero(side.slot_kind == _PAD).flatten()
    return TokenRows(side.slot_of_token.to(device), padding.to(device), side.num_slots)


def _to_device(side: SlotLayout, device: torch.device) -> SlotLayout:
    return dataclasses.replace(
        side, slot_tile=side.slot_tile.to(device), slot_kind=side.slot_kind.to(device)
    )
