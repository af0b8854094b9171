"""Sliding-tile attention (STA) is exact: on CPU in fp32 it equals dense attention under the
tile/window mask built here from the definition (not from ``sta_mask``), the block mask
computes exactly the allowed key blocks, a window covering every tile is plain attention,
and the Wan DiT gives the same result with STA on one process and on SP ranks.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastvideo.attention import DistributedAttention, LocalAttention
from fastvideo.attention.backends.abstract import VideoGrid, _Backend
from fastvideo.attention.backends.sliding_tile_attn import SlidingTileAttnImpl
from fastvideo.attention.selector import ENV_VAR, forced_attention_backend
from fastvideo.attention.sta_mask import (
    _PAD,
    SlidingTileConfig,
    _padding_key_mask_mod,
    sta_plan,
    tile_layout,
)
from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.models.dits.wanvideo import WanTransformer3DModel
from fastvideo.models.loader.component_loader import load_component
from fastvideo.testing.distributed import run_on_ranks
from tests.engine_checks.sta_checks import sliding_tile_sp_checks

TOL = 1e-5
STA = (_Backend.SLIDING_TILE_ATTN, _Backend.TORCH_SDPA)

# (grid, tile, window, extra tokens, block size, kv heads)
CASES = [
    ((5, 7, 9), (2, 4, 4), (1, 1, 1), 0, 16, 2),  # partial tiles on every axis
    ((5, 7, 9), (2, 4, 4), (3, 3, 3), 0, 16, 2),
    ((5, 7, 9), (2, 4, 4), (3, 5, 5), 0, 16, 2),  # (3, 5, 5): +-2 tiles in h and w
    ((5, 7, 9), (2, 4, 4), (3, 3, 3), 6, 16, 2),  # text tokens, padded to one block
    ((5, 7, 9), (2, 4, 4), (1, 1, 1), 37, 16, 1),  # text over three blocks; grouped kv heads
    ((5, 7, 9), (2, 4, 4), (3, 5, 5), 20, 128, 2),  # 128 blocks: tiles padded 32 -> 128
    ((4, 6, 10), (2, 3, 5), (3, 1, 3), 0, 8, 2),  # tiles of 30 span blocks of 8 unevenly
    ((7, 4, 3), (6, 8, 8), (3, 3, 3), 3, 128, 2),  # default tile larger than the grid
]


def _ids(case) -> str:
    grid, tile, window, extra, block, kv_heads = case
    return f"grid{grid}-tile{tile}-win{window}-extra{extra}-block{block}-kv{kv_heads}"


def reference_mask(grid, tile, window, extra: int) -> torch.Tensor:
    """(N, N) bool, from the definition: video token (t, h, w) lies in tile (t // tt, h // th,
    w // tw); a query sees a key when their tiles differ by at most (window - 1) / 2 on every
    axis; the ``extra`` tokens after the video see everything and are seen by everything."""
    t, h, w = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    tiles = torch.stack([t // tile[0], h // tile[1], w // tile[2]], dim=-1).reshape(-1, 3)
    reach = torch.tensor([(size - 1) // 2 for size in window])
    video = ((tiles[:, None] - tiles[None]).abs() <= reach).all(dim=-1)
    n_video = video.shape[0]
    mask = torch.ones(n_video + extra, n_video + extra, dtype=torch.bool)
    mask[:n_video, :n_video] = video
    return mask


def masked_attention(q, k, v, mask=None) -> torch.Tensor:
    """Dense SDPA over (B, S, H, D) under a boolean (S, S) mask (None: plain attention)."""
    out = F.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (q, k, v)),
        attn_mask=mask,
        enable_gqa=k.shape[2] != q.shape[2],
    )
    return out.transpose(1, 2)


def _qkv(num_tokens: int, kv_heads: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, num_tokens, 2, 8, generator=gen)
    k, v = (torch.randn(2, num_tokens, kv_heads, 8, generator=gen) for _ in range(2))
    return q, k, v


def _sta(config: SlidingTileConfig, kv_heads: int = 2) -> SlidingTileAttnImpl:
    return SlidingTileAttnImpl(2, 8, 8**-0.5, num_kv_heads=kv_heads, config=config)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_sliding_tile_attention_equals_dense_attention_under_the_tile_window_mask(case):
    grid, tile, window, extra, block, kv_heads = case
    video_grid = VideoGrid(*grid, extra_tokens=extra)
    q, k, v = _qkv(video_grid.num_tokens, kv_heads)
    out = _sta(SlidingTileConfig(tile, window, block), kv_heads).forward(
        q, k, v, video_grid=video_grid
    )
    expected = masked_attention(q, k, v, reference_mask(grid, tile, window, extra))
    diff = (out - expected).abs().max().item()
    print(f"{_ids(case)}: max abs diff {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("kv_block_size", [None, 8], ids=["kv-default", "kv8"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_block_mask_computes_exactly_the_allowed_blocks_and_never_a_padding_key(
    case, kv_block_size
):
    """What a block-sparse kernel computes: full blocks whole, partial blocks through
    mask_mod, nothing else (the eager path above applies mask_mod to every pair, so this
    checks the block lists on their own). Queries and keys have their own block sizes."""
    grid, tile, window, extra, block, _ = case
    config = SlidingTileConfig(tile, window, block, kv_block_size)
    plan = sta_plan(grid, extra, config, torch.device("cpu"))
    bm = plan.block_mask
    query, key = plan.layout.query, plan.layout.key
    kv_block = config.kv_block_size
    computed = torch.zeros(query.num_slots, key.num_slots, dtype=torch.bool)
    partial_blocks = 0
    for qb in range(query.num_blocks):
        rows = torch.arange(qb * block, (qb + 1) * block)
        for kb in bm.full_kv_indices[0, 0, qb, : bm.full_kv_num_blocks[0, 0, qb]].tolist():
            computed[rows[:, None], torch.arange(kb * kv_block, (kb + 1) * kv_block)] = True
        for kb in bm.kv_indices[0, 0, qb, : bm.kv_num_blocks[0, 0, qb]].tolist():
            cols = torch.arange(kb * kv_block, (kb + 1) * kv_block)
            values = bm.mask_mod(0, 0, rows[:, None], cols[None, :])
            # Partial blocks are the ones holding padding keys: some slots in, some out.
            assert values.any() and not values.all()
            # What CUDA's kernel evaluates there instead: the padding-key test alone. Equal
            # for every real query (padding queries' rows are computed and thrown away).
            kernel = _padding_key_mask_mod(key)(0, 0, rows[:, None], cols[None, :])
            real_rows = query.slot_kind[rows] != _PAD
            assert torch.equal(kernel.expand_as(values)[real_rows], values[real_rows])
            computed[rows[:, None], cols[None, :]] = values
            partial_blocks += 1

    q_real, k_real = query.slot_of_token, key.slot_of_token
    padding = torch.ones(key.num_slots, dtype=torch.bool)
    padding[k_real] = False
    assert not computed[:, padding].any()
    assert torch.equal(computed[q_real][:, k_real], reference_mask(grid, tile, window, extra))
    print(f"{_ids(case)}: sparsity {plan.layout.block_sparsity:.3f}, {partial_blocks} partial")


def test_blocks_of_64_compute_less_than_128_at_the_wan_grid():
    """Why the default blocks are 64, not FlexAttention's 128: at the 1.3B grid, 6x8x8 tiles
    and a (3, 3, 3) window, fewer padding rows to compute and far fewer partially-masked
    blocks."""
    grid = (21, 30, 52)
    wide = tile_layout(grid, 0, SlidingTileConfig((6, 8, 8), (3, 3, 3), 128, 128))
    default = tile_layout(grid, 0, SlidingTileConfig())
    assert default.key.block_size == 64 and default.query.block_size == 64
    assert SlidingTileConfig(block_size=128).kv_block_size == 64
    assert default.dense_work_fraction < 0.95 * wide.dense_work_fraction
    assert default.partial_block_fraction < 0.5 * wide.partial_block_fraction


@pytest.mark.parametrize("extra", [0, 11])
def test_window_covering_every_tile_equals_plain_attention(extra):
    # 5x7x9 in tiles of 2x4x4 is 3x2x3 tiles: a (5, 3, 5) window reaches all from anywhere.
    video_grid = VideoGrid(5, 7, 9, extra_tokens=extra)
    q, k, v = _qkv(video_grid.num_tokens)
    out = _sta(SlidingTileConfig((2, 4, 4), (5, 3, 5), 16)).forward(q, k, v, video_grid=video_grid)
    diff = (out - masked_attention(q, k, v)).abs().max().item()
    print(f"extra={extra}: max abs diff vs SDPA {diff:.2e}")
    assert diff <= TOL


def test_block_sparsity_counts_the_skipped_blocks():
    # 12x16x16 in 6x8x8 tiles: 8 tiles of 384 tokens = 3 blocks each, 24 blocks in all. A
    # (1, 1, 1) window keeps each tile's own 3x3 block pairs: 72 of 576.
    def sparsity(grid, tile=(6, 8, 8), window=(3, 3, 3), extra_tokens=0, block_size=64):
        config = SlidingTileConfig(tile, window, block_size)
        return tile_layout(grid, extra_tokens, config).block_sparsity

    assert sparsity((12, 16, 16), window=(1, 1, 1)) == pytest.approx(1 - 72 / 576)
    assert sparsity((12, 16, 16), window=(3, 3, 3)) == 0.0
    # 4x4x4 in 2x2x2 tiles with blocks of 8: 8 tile blocks, then 1 text block. Computed:
    # the 8 tiles' own pairs, and the text block's row and column (9 + 9 - 1).
    sparse = sparsity((4, 4, 4), (2, 2, 2), (1, 1, 1), extra_tokens=8, block_size=8)
    assert sparse == pytest.approx(1 - (8 + 17) / 81)


def test_block_masks_are_cached_per_grid_config_and_device():
    config = SlidingTileConfig((2, 4, 4), (3, 3, 3), 16)
    cpu = torch.device("cpu")
    first = sta_plan((5, 7, 9), 0, config, cpu)
    assert sta_plan((5, 7, 9), 0, SlidingTileConfig([2, 4, 4], [3, 3, 3], 16), cpu) is first
    assert sta_plan((5, 7, 9), 1, config, cpu) is not first


def test_sliding_tile_layer_called_without_video_grid_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with forced_attention_backend("SLIDING_TILE_ATTN"):
        attn = LocalAttention(2, 8, supported_attention_backends=STA)
    q = torch.randn(1, 8, 2, 8)
    with pytest.raises(ValueError, match="SLIDING_TILE_ATTN needs to know where the tokens sit"):
        attn(q, q, q)
    assert attn(q, q, q, video_grid=VideoGrid(2, 2, 2)).shape == q.shape


def test_tile_and_window_must_be_odd_positive_triples():
    with pytest.raises(ValueError, match=r"sta_window=\(3, 2, 3\) must be three odd positive"):
        FastVideoArgs.from_kwargs("unused", sta_window=(3, 2, 3))
    with pytest.raises(ValueError, match=r"sta_tile=\(6, 0, 8\) must be three positive ints"):
        FastVideoArgs.from_kwargs("unused", sta_tile=(6, 0, 8))


def test_fastvideo_args_sta_options_reach_the_layers_even_through_json(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    args = FastVideoArgs.from_kwargs(
        "unused", attention_backend="sliding_tile_attn", sta_tile=(2, 4, 4), sta_window=(1, 3, 5)
    )
    # The multi-rank executor hands the args to its ranks as JSON (tuples become lists).
    args = FastVideoArgs(**json.loads(json.dumps(dataclasses.asdict(args))))
    args.validate()
    with forced_attention_backend(args.attention_backend, args.sliding_tile_config()):
        attn = DistributedAttention(2, 8, supported_attention_backends=STA)
    assert attn.backend.get_enum() is _Backend.SLIDING_TILE_ATTN
    assert attn.impl.config == SlidingTileConfig((2, 4, 4), (1, 3, 5))


def test_loader_builds_the_dit_with_sta_in_self_attention_only(tiny_t2v, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    args = FastVideoArgs.from_kwargs(
        tiny_t2v,
        device="cpu",
        attention_backend="SLIDING_TILE_ATTN",
        sta_tile=(1, 2, 2),
        sta_window=(3, 1, 3),
    )
    dit = load_component("transformer", "diffusers", "WanTransformer3DModel", Path(tiny_t2v), args)
    for block in dit.blocks:
        assert block.attn1.attn.backend.get_enum() is _Backend.SLIDING_TILE_ATTN
        assert block.attn1.attn.impl.config == SlidingTileConfig((1, 2, 2), (3, 1, 3))
        # Cross-attention to the text has no video layout: it keeps a dense kernel.
        assert block.attn2.attn.backend.get_enum() is _Backend.TORCH_SDPA


# ---------------------------------------------------------------------------------------------
# The Wan DiT
# ---------------------------------------------------------------------------------------------

DIT_CONFIG = {
    "in_channels": 4, "out_channels": 4, "freq_dim": 16, "rope_max_seq_len": 64,
    "num_attention_heads": 2, "attention_head_dim": 8, "text_dim": 24, "ffn_dim": 40,
    "num_layers": 2,
}  # fmt: skip
# (T, H, W) latents -> token grids (1, 5, 7) = 35 tokens (odd: SP pads it) and (3, 3, 5).
LATENTS = [(1, 10, 14), (3, 6, 10)]
# Tiles of 1x2x2 tokens, each query seeing its tile row in h: sparse at both grids.
SP_STA = SlidingTileConfig((1, 2, 2), (1, 3, 1), 8)


@functools.cache
def _dit_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = WanTransformer3DModel(**DIT_CONFIG)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.state_dict()


def _dit(sliding_tile: SlidingTileConfig | None) -> WanTransformer3DModel:
    backend = None if sliding_tile is None else "SLIDING_TILE_ATTN"
    with forced_attention_backend(backend, sliding_tile):
        model = WanTransformer3DModel(**DIT_CONFIG).eval()
    model.load_state_dict(_dit_weights())
    return model


def _dit_inputs(latent: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, DIT_CONFIG["in_channels"], *latent, generator=gen)
    return x, torch.rand(2, generator=gen) * 1000, torch.randn(2, 7, 24, generator=gen)


def test_dit_with_a_covering_window_equals_the_dense_dit(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    # Grid 3x3x5 in tiles of 2x2x2 is 2x2x3 tiles; a (3, 3, 5) window covers them all.
    covering = SlidingTileConfig((2, 2, 2), (3, 3, 5), 16)
    sta, dense = _dit(covering), _dit(None)
    assert sta.blocks[0].attn1.attn.backend.get_enum() is _Backend.SLIDING_TILE_ATTN
    assert dense.blocks[0].attn1.attn.backend.get_enum() is _Backend.TORCH_SDPA
    inputs = _dit_inputs((3, 6, 10))
    with torch.no_grad():
        diff = (sta(*inputs) - dense(*inputs)).abs().max().item()
        narrow = (_dit(SP_STA)(*inputs) - dense(*inputs)).abs().max().item()
    print(f"STA DiT (covering window) vs dense DiT: max abs diff {diff:.2e}")
    assert diff <= TOL
    assert narrow > 1e-3  # a window that does not cover everything does change the output


@functools.cache
def _sp2_run() -> list[dict]:
    inputs = [_dit_inputs(latent) for latent in LATENTS]
    return run_on_ranks(
        sliding_tile_sp_checks, 2, args=(DIT_CONFIG, _dit_weights(), inputs, SP_STA), sp_size=2
    )


def test_dit_on_two_ulysses_ranks_equals_single_process_sliding_tile_dit(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    model = _dit(SP_STA)
    for index, latent in enumerate(LATENTS):
        with torch.no_grad():
            expected = model(*_dit_inputs(latent))
        diff = max((rank["dit"][index] - expected).abs().max().item() for rank in _sp2_run())
        print(f"sp=2 (ulysses 2) STA DiT latent={latent}: max abs diff {diff:.2e}")
        assert diff <= TOL


def test_sliding_tile_on_the_ring_path_is_a_clear_error():
    for rank in _sp2_run():
        assert rank["ring_error"] is not None
        assert "SLIDING_TILE_ATTN needs each rank to hold the whole sequence" in rank["ring_error"]
        assert "ulysses=1 x ring=2" in rank["ring_error"]


def test_cuda_kernel_tiles_divide_the_blocks_or_the_error_names_the_rule():
    from fastvideo.attention.backends.sliding_tile_attn import default_kernel_options

    cpu = torch.device("cpu")  # no capability query: only sm90 adds its measured options
    options = default_kernel_options(cpu, SlidingTileConfig(block_size=128, kv_block_size=32))
    assert (options["BLOCK_M"], options["BLOCK_N"]) == (128, 32)
    options = default_kernel_options(cpu, SlidingTileConfig((1, 2, 2), (3, 1, 3), 48))
    assert (options["BLOCK_M"], options["BLOCK_N"]) == (16, 16)
    with pytest.raises(ValueError, match="multiples of 16, got block_size=8"):
        default_kernel_options(cpu, SlidingTileConfig((1, 2, 2), (3, 1, 3), 8))


def test_the_padding_only_mask_is_chosen_only_when_the_compiled_kernel_runs(monkeypatch):
    """FlexAttention's eager path evaluates mask_mod on every pair: with the padding-only
    test it would attend everywhere. Whenever Dynamo will not compile, the whole rule."""
    from fastvideo.attention.backends.sliding_tile_attn import _compiler_runs

    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    assert _compiler_runs()
    with torch.compiler.set_stance("force_eager"):
        assert not _compiler_runs()
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    assert not _compiler_runs()
    plan = sta_plan((5, 7, 9), 0, SlidingTileConfig((2, 4, 4), (3, 3, 3), 16), torch.device("cpu"))
    assert plan.sparse_kernel_block_mask is plan.block_mask  # off CUDA: the whole rule only
