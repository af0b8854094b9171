"""Tiled decoding of the Wan2.1 VAE: parity with diffusers' tiled decode, and the decode
split across sequence-parallel ranks (CPU, fp32, tiny random-weight config)."""

import weakref

import pytest
import torch
from diffusers import AutoencoderKLWan as DiffusersWanVAE

from fastvideo.models.vaes.tiling import TileConfig, TileGrid, decode_tiled
from fastvideo.models.vaes.wanvae import AutoencoderKLWan
from fastvideo.testing.distributed import run_on_ranks
from tests.engine_checks.vae_checks import decode_on_rank, random_vae_pair

TOL = 1e-5

# The released Wan2.1 layout (8x spatial, 4x temporal), tiny; and a variant with temporal
# upsampling in other levels.
CONFIGS = {
    "wan21_layout": {
        "base_dim": 8,
        "z_dim": 4,
        "dim_mult": [1, 2, 2, 2],
        "num_res_blocks": 1,
        "temperal_downsample": [False, True, True],
    },
    "early_temporal": {
        "base_dim": 8,
        "z_dim": 4,
        "dim_mult": [1, 2, 2, 2],
        "num_res_blocks": 1,
        "temperal_downsample": [True, True, False],
    },
}

_models: dict[str, tuple[DiffusersWanVAE, AutoencoderKLWan]] = {}


def _model_pair(name: str) -> tuple[DiffusersWanVAE, AutoencoderKLWan]:
    """diffusers reference with random weights (gains and biases moved off their defaults)
    and ours loaded from its state_dict (cached)."""
    if name not in _models:
        _models[name] = random_vae_pair(CONFIGS[name])
    return _models[name]


def _latents(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _decode(vae: AutoencoderKLWan, z: torch.Tensor, tiling: tuple | None) -> torch.Tensor:
    if tiling is None:
        vae.disable_tiling()
    else:
        vae.enable_tiling(*tiling)
    try:
        with torch.no_grad():
            return vae.decode(z)
    finally:
        vae.disable_tiling()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# (tile_sample_min_height, tile_sample_min_width, stride_height, stride_width) in pixels;
# latents are (B, z_dim, T, h, w). The tiny VAE upsamples 8x, so a 32 px tile is 4 latents.
@pytest.mark.parametrize(
    ("name", "tiling", "latent_shape"),
    [
        ("wan21_layout", (32, 32, 24, 24), (1, 4, 1, 7, 9)),  # 3x3 tiles, last ones cut short
        ("wan21_layout", (32, 32, 24, 24), (2, 4, 3, 10, 5)),  # 4x2 tiles, batch of 2
        ("wan21_layout", (48, 40, 32, 24), (1, 4, 3, 5, 11)),  # unequal tile sides, 2x4
        ("wan21_layout", (32, 48, 16, 16), (1, 4, 1, 9, 7)),  # stride half the tile: 5x4
        ("wan21_layout", (32, 32, 32, 32), (1, 4, 3, 6, 6)),  # no overlap: nothing blends
        ("wan21_layout", (32, 32, 24, 24), (1, 4, 3, 3, 13)),  # one tile row, 5 columns
        ("early_temporal", (32, 32, 24, 24), (1, 4, 3, 7, 5)),
    ],
    ids=[
        "3x3_tiles_1frame",
        "4x2_tiles_batch2_3frames",
        "2x4_unequal_tiles_3frames",
        "5x4_half_stride_1frame",
        "2x2_no_overlap_3frames",
        "1x5_tiles_3frames",
        "early_temporal_3x2_tiles",
    ],
)
def test_tiled_decode_matches_diffusers_tiled_decode(
    name: str, tiling: tuple[int, int, int, int], latent_shape: tuple[int, ...]
) -> None:
    reference, ours = _model_pair(name)
    z = _latents(latent_shape, seed=1)
    reference.enable_tiling(*tiling)
    try:
        with torch.no_grad():
            expected = reference.decode(z).sample
    finally:
        reference.disable_tiling()
    actual = _decode(ours, z, tiling)
    assert _max_diff(actual, expected) <= TOL
    # Not vacuous: the clamp leaves most values alone, and tiling changed the result.
    assert (expected.abs() < 1).float().mean() > 0.5
    assert _max_diff(actual, _decode(ours, z, None)) > 1e-3


def test_latent_within_one_tile_decodes_whole_like_plain_decode() -> None:
    _, ours = _model_pair("wan21_layout")
    z = _latents((1, 4, 3, 4, 3), seed=2)
    assert torch.equal(_decode(ours, z, (32, 32, 24, 24)), _decode(ours, z, None))


def test_disable_tiling_restores_plain_decode() -> None:
    reference, ours = _model_pair("wan21_layout")
    z = _latents((1, 4, 1, 7, 9), seed=3)
    ours.enable_tiling(32, 32, 24, 24)
    ours.disable_tiling()
    assert not ours.use_tiling
    with torch.no_grad():
        plain = ours.decode(z)
        expected = reference.decode(z).sample
    assert _max_diff(plain, expected) <= TOL


@pytest.mark.parametrize(
    "tiling",
    [(30, 32, 24, 24), (32, 32, 24, 20), (32, 32, 40, 24), (32, 0, 24, 24)],
    ids=["height_not_multiple_of_8", "stride_not_multiple_of_8", "stride_over_tile", "zero"],
)
def test_tile_sizes_that_would_misalign_tiles_are_rejected(tiling: tuple) -> None:
    _, ours = _model_pair("wan21_layout")
    with pytest.raises(ValueError, match="tile_sample"):
        ours.enable_tiling(*tiling)
    assert not ours.use_tiling


def test_only_one_decoded_tile_is_alive_at_a_time() -> None:
    grid = TileGrid(9, 11, TileConfig(32, 32, 24, 24), spatial_ratio=8)
    alive: list[weakref.ref] = []

    def fake_decode(z_tile: torch.Tensor) -> torch.Tensor:
        assert all(ref() is None for ref in alive), "an earlier tile is still referenced"
        tile = z_tile.repeat_interleave(8, dim=-2).repeat_interleave(8, dim=-1)
        alive.append(weakref.ref(tile))
        return tile

    z = _latents((1, 2, 2, 9, 11), seed=4)
    video = decode_tiled(fake_decode, z, grid)
    assert len(alive) == len(grid.tiles) == 12
    # Overlapping tiles of an upsample agree, so blending them must give the upsample back:
    # every tile landed where it belongs.
    upsampled = z.repeat_interleave(8, dim=-2).repeat_interleave(8, dim=-1)
    assert _max_diff(video, upsampled) <= 1e-6


def _state(name: str) -> tuple[dict, dict]:
    _, ours = _model_pair(name)
    return CONFIGS[name], {k: v.clone() for k, v in ours.state_dict().items()}


def test_split_decode_on_sp3_equals_single_rank_tiled_decode_on_every_rank() -> None:
    _, ours = _model_pair("wan21_layout")
    config, state = _state("wan21_layout")
    tiled = (32, 32, 24, 24)
    cases = [
        (_latents((1, 4, 3, 5, 10), seed=5), tiled),  # 2x4 = 8 tiles: ranks decode 3, 3, 2
        # Tiling off: the split uses the default 256 px tiles; a 33-latent-high frame
        # holds 2 of them, so one rank idles.
        (_latents((1, 4, 1, 33, 5), seed=6), None),
        # Tiling off and the frame fits one default tile: every rank decodes it whole.
        (_latents((1, 4, 3, 3, 5), seed=7), None),
    ]
    expected = [
        _decode(ours, cases[0][0], tiled),
        _decode(ours, cases[1][0], (256, 256, 192, 192)),
        _decode(ours, cases[2][0], None),
    ]
    per_rank = run_on_ranks(decode_on_rank, world_size=3, args=(config, state, cases), sp_size=3)

    assert [[calls for _, calls in ranks] for ranks in zip(*per_rank, strict=True)] == [
        [3, 3, 2],
        [1, 1, 0],
        [1, 1, 1],
    ]
    for case, want in enumerate(expected):
        videos = [results[case][0] for results in per_rank]
        assert _max_diff(videos[0], want) <= TOL
        assert all(torch.equal(video, videos[0]) for video in videos[1:])
    # The default-tiled split decode is a real tiled decode, not the plain one.
    assert _max_diff(expected[1], _decode(ours, cases[1][0], None)) > 1e-3


def test_split_decode_on_sp2_with_cfg2_equals_single_rank_tiled_decode() -> None:
    # World of 4 = 2 CFG branches x SP 2: each SP group ([0, 1] and [2, 3]) splits alone.
    _, ours = _model_pair("wan21_layout")
    config, state = _state("wan21_layout")
    cases = [
        (_latents((2, 4, 3, 10, 5), seed=8), (32, 32, 24, 24)),  # 4x2 tiles, batch of 2
        (_latents((1, 4, 3, 7, 9), seed=9), (48, 40, 32, 24)),  # 2x3 tiles, unequal sides
    ]
    expected = [_decode(ours, z, tiling) for z, tiling in cases]
    per_rank = run_on_ranks(
        decode_on_rank, world_size=4, args=(config, state, cases), sp_size=2, cfg_parallel_size=2
    )

    assert [[calls for _, calls in ranks] for ranks in zip(*per_rank, strict=True)] == [
        [4, 4, 4, 4],
        [3, 3, 3, 3],
    ]
    for case, want in enumerate(expected):
        videos = [results[case][0] for results in per_rank]
        assert _max_diff(videos[0], want) <= TOL
        assert all(torch.equal(video, videos[0]) for video in videos[1:])
