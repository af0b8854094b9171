"""Parity of fastvideo's Wan2.1 VAE with diffusers' AutoencoderKLWan (CPU, fp32, tiny configs)."""

import pytest
import torch
from diffusers import AutoencoderKLWan as DiffusersWanVAE

from fastvideo.models.vaes.wanvae import AutoencoderKLWan
from tests.engine_checks.vae_checks import random_vae_pair

TOL = 1e-5

# Tiny variants of the Wan2.1 architecture. "wan21_layout" keeps the released layout
# (4 levels, 8x spatial, 4x temporal with temporal downsampling in the deeper levels).
CONFIGS = {
    "wan21_layout": {
        "base_dim": 8,
        "z_dim": 4,
        "dim_mult": [1, 2, 2, 2],
        "num_res_blocks": 1,
        "temperal_downsample": [False, True, True],
    },
    "early_temporal_z16": {
        "base_dim": 8,
        "z_dim": 16,
        "dim_mult": [1, 2, 2, 2],
        "num_res_blocks": 2,
        "temperal_downsample": [True, True, False],
    },
    "three_levels_own_decoder_dim": {
        "base_dim": 16,
        "decoder_base_dim": 8,
        "z_dim": 4,
        "dim_mult": [1, 2, 4],
        "num_res_blocks": 1,
        "temperal_downsample": [True, False],
    },
}

_models: dict[str, tuple[DiffusersWanVAE, AutoencoderKLWan]] = {}


def _model_pair(name: str) -> tuple[DiffusersWanVAE, AutoencoderKLWan]:
    """diffusers reference with random weights and ours loaded from its state_dict (cached)."""
    if name not in _models:
        _models[name] = random_vae_pair(CONFIGS[name])
    return _models[name]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_keys_and_shapes_match_diffusers(name: str) -> None:
    reference, ours = _model_pair(name)
    ref_shapes = {k: v.shape for k, v in reference.state_dict().items()}
    our_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes


def test_released_wan21_config_has_diffusers_state_dict_layout() -> None:
    # Full-size default (Wan2.1) config, built on the meta device to skip weight init.
    with torch.device("meta"):
        reference = DiffusersWanVAE()
        ours = AutoencoderKLWan.from_config(dict(reference.config))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    assert ours.config.z_dim == 16
    assert list(ours.config.latents_mean) == list(reference.config.latents_mean)
    assert list(ours.config.latents_std) == list(reference.config.latents_std)
    assert ours.config.scale_factor_temporal == 4
    assert ours.config.scale_factor_spatial == 8


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize(
    "latent_shape",
    [(1, 1, 3, 5), (1, 2, 5, 7), (2, 3, 3, 5), (1, 3, 1, 1)],
    ids=["1frame_3x5", "2frames_5x7", "batch2_3frames_3x5", "3frames_1x1"],
)
def test_decode_matches_diffusers(name: str, latent_shape: tuple[int, int, int, int]) -> None:
    reference, ours = _model_pair(name)
    batch, frames, h, w = latent_shape
    torch.manual_seed(1)
    z = torch.randn(batch, ours.config.z_dim, frames, h, w)
    with torch.no_grad():
        expected = reference.decode(z).sample
        actual = ours.decode(z)
    assert _max_diff(actual, expected) <= TOL
    # Guard against a vacuous pass where the [-1, 1] clamp flattens everything.
    assert (expected.abs() < 1).float().mean() > 0.5
    assert expected.std() > 1e-2


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("chunk_frames", [2, 7])
def test_decode_in_chunks_of_latent_frames_matches_diffusers(name: str, chunk_frames: int) -> None:
    """Several latent frames per decoder call: the causal caches carry exactly what the
    frame-by-frame decode carries (6 latent frames: chunks 1+2+2+1 and 1+5)."""
    reference, ours = _model_pair(name)
    torch.manual_seed(2)
    z = torch.randn(1, ours.config.z_dim, 6, 3, 5)
    with torch.no_grad():
        expected = reference.decode(z).sample
        ours.set_decode_chunk_frames(chunk_frames)
        try:
            actual = ours.decode(z)
        finally:
            ours.set_decode_chunk_frames(1)
    assert _max_diff(actual, expected) <= TOL
    assert expected.std() > 1e-2


@pytest.mark.parametrize("name", CONFIGS)
def test_channels_last_decode_matches_diffusers(name: str) -> None:
    reference, ours = _model_pair(name)
    torch.manual_seed(3)
    z = torch.randn(1, ours.config.z_dim, 4, 3, 5)
    with torch.no_grad():
        expected = reference.decode(z).sample
        ours.use_channels_last(True)
        try:
            conv = next(m for m in ours.modules() if isinstance(m, torch.nn.Conv3d))
            assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
            actual = ours.decode(z)
        finally:
            ours.use_channels_last(False)
    assert _max_diff(actual, expected) <= TOL
    assert expected.std() > 1e-2


@pytest.mark.parametrize("frames", [0, -1, 1.5, True])
def test_decode_chunk_frames_must_be_a_positive_int(frames) -> None:
    _, ours = _model_pair("early_temporal_z16")
    with pytest.raises(ValueError, match="decode_chunk_frames must be a positive int"):
        ours.set_decode_chunk_frames(frames)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize(
    "video_shape",
    [(1, 1, 24, 40), (1, 5, 24, 40), (2, 9, 40, 56)],
    ids=["1frame_24x40", "5frames_24x40", "batch2_9frames_40x56"],
)
def test_encode_mean_and_sample_match_diffusers(
    name: str, video_shape: tuple[int, int, int, int]
) -> None:
    reference, ours = _model_pair(name)
    batch, frames, h, w = video_shape
    torch.manual_seed(2)
    x = torch.rand(batch, 3, frames, h, w) * 2 - 1
    with torch.no_grad():
        expected = reference.encode(x).latent_dist
        actual = ours.encode(x)
    assert _max_diff(actual.mean, expected.mean) <= TOL
    assert _max_diff(actual.mode(), expected.mode()) <= TOL
    sample_ref = expected.sample(generator=torch.Generator().manual_seed(3))
    sample_ours = actual.sample(generator=torch.Generator().manual_seed(3))
    assert _max_diff(sample_ours, sample_ref) <= TOL


def test_sample_with_per_item_generators_matches_diffusers() -> None:
    reference, ours = _model_pair("wan21_layout")
    torch.manual_seed(4)
    x = torch.rand(2, 3, 5, 24, 40) * 2 - 1
    with torch.no_grad():
        expected = reference.encode(x).latent_dist
        actual = ours.encode(x)

    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in (5, 6)]

    assert _max_diff(actual.sample(generators()), expected.sample(generators())) <= TOL


def test_encode_drops_incomplete_trailing_chunk_like_diffusers() -> None:
    reference, ours = _model_pair("wan21_layout")
    torch.manual_seed(6)
    x = torch.rand(1, 3, 7, 24, 40) * 2 - 1  # frame 0 + one chunk of 4 + 2 leftover frames
    with torch.no_grad():
        expected = reference.encode(x).latent_dist.mean
        actual = ours.encode(x).mean
        truncated = ours.encode(x[:, :, :5]).mean
    assert actual.shape[2] == 2
    assert _max_diff(actual, expected) <= TOL
    assert torch.equal(actual, truncated)


def test_clip_output_false_skips_the_clamp() -> None:
    reference, _ = _model_pair("wan21_layout")
    unclipped = AutoencoderKLWan(**CONFIGS["wan21_layout"], clip_output=False).eval()
    unclipped.load_state_dict(reference.state_dict(), strict=True)
    torch.manual_seed(7)
    z = torch.randn(1, 4, 2, 3, 5) * 10
    with torch.no_grad():
        raw = unclipped.decode(z)
        expected = reference.decode(z).sample
    assert raw.abs().max() > 1
    assert _max_diff(raw.clamp(-1, 1), expected) <= TOL


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("is_residual", True),
        ("patch_size", 2),
        ("attn_scales", [0.5]),
        ("temperal_downsample", [False, True]),
    ],
)
def test_unsupported_config_raises_value_error_naming_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        AutoencoderKLWan(**{**CONFIGS["wan21_layout"], field: value})


def test_unknown_config_key_is_rejected() -> None:
    with pytest.raises(TypeError):
        AutoencoderKLWan.from_config({**CONFIGS["wan21_layout"], "not_a_wan_key": 1})
