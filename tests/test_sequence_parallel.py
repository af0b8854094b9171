"""Sequence parallelism on CPU gloo ranks: Ulysses all-to-all, ring attention and the Wan DiT's
token sharding give every rank the single-process result (fp32, within 1e-5), for SP degrees
the head count divides, does not divide (ring) or partly divides (Ulysses x ring), and token
counts that do not divide by the SP degree.

Each SP degree spawns its ranks once (``_run``); the tests read from that run.
"""

from __future__ import annotations

import functools

import pytest
import torch
from diffusers import WanTransformer3DModel as DiffusersWanDiT

from fastvideo.attention.sequence_parallel import local_seq_len, sp_factorisation
from fastvideo.models.dits.wanvideo import TEXT_CONTEXT_LENGTH, WanTransformer3DModel
from fastvideo.models.loader.weight_utils import load_weights_into_model
from fastvideo.testing.distributed import run_on_ranks
from tests.engine_checks.sp_checks import (
    attention_inputs,
    reference_attention,
    sequence_parallel_checks,
)

TOL = 1e-5
SP_DEGREES = (2, 3, 4)

# (batch, tokens, heads, head_dim); what each SP degree makes of it is in the comments.
ATTENTION_CASES = [
    (2, 13, 2, 8),  # sp2: Ulysses 2; sp3: ring 3; sp4: Ulysses 2 x ring 2, 3 padded tokens
    (2, 11, 3, 8),  # sp2: ring 2; sp3: Ulysses 3; sp4: ring 4
    (1, 2, 2, 8),  # fewer tokens than ranks: some ranks hold nothing but padding
    (2, 16, 6, 8),  # sp4: Ulysses 2 x ring 2 without padding
    (1, 7, 12, 4),  # 12 heads: sp4 -> Ulysses 4, sp3 -> Ulysses 3
]

_BASE = {"in_channels": 4, "out_channels": 4, "freq_dim": 16, "rope_max_seq_len": 64}
DIT_CONFIGS = {
    "t2v": dict(_BASE, num_attention_heads=2, attention_head_dim=8, text_dim=24, ffn_dim=40,
                num_layers=2),
    "i2v": dict(_BASE, num_attention_heads=2, attention_head_dim=8, text_dim=16, ffn_dim=32,
                num_layers=2, image_dim=12, added_kv_proj_dim=16, in_channels=9),
}  # fmt: skip
# Wan2.1-1.3B's head count on 8 ranks (the 8-GPU issue's layout): Ulysses 4 x ring 2.
TWELVE_HEADS = {
    "t2v-12-heads": dict(_BASE, num_attention_heads=12, attention_head_dim=12, text_dim=24,
                         ffn_dim=40, num_layers=1),
}  # fmt: skip
# (T, H, W) latents -> 35 tokens (divides by none of 2, 3, 4) and 45 (only by 3).
LATENT_SIZES = [(1, 10, 14), (3, 6, 10)]


@functools.cache
def _dit(name: str) -> WanTransformer3DModel:
    """Random diffusers weights loaded through our loader, as in test_wan_dit_parity."""
    torch.manual_seed(0)
    reference = DiffusersWanDiT(**{**DIT_CONFIGS, **TWELVE_HEADS}[name]).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.1 * torch.randn_like(param))
    config = {k: v for k, v in reference.config.items() if not k.startswith("_")}
    model = WanTransformer3DModel(**config).eval()
    load_weights_into_model(model, reference.state_dict().items(), component="transformer")
    model.constructor_config = config
    return model


def _dit_inputs(name: str, latent: tuple[int, int, int]) -> tuple:
    cfg = {**DIT_CONFIGS, **TWELVE_HEADS}[name]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg["in_channels"], *latent, generator=gen)
    t = torch.rand(2, generator=gen) * 1000
    if cfg.get("image_dim") is None:
        return x, t, torch.randn(2, 7, cfg["text_dim"], generator=gen)
    text = torch.randn(2, TEXT_CONTEXT_LENGTH, cfg["text_dim"], generator=gen)
    return x, t, text, torch.randn(2, 5, cfg["image_dim"], generator=gen)


@functools.cache
def _run(sp: int) -> dict:
    dit_cases = [
        (
            _dit(name).constructor_config,
            _dit(name).state_dict(),
            [_dit_inputs(name, latent) for latent in LATENT_SIZES],
        )
        for name in DIT_CONFIGS
    ]
    return run_on_ranks(sequence_parallel_checks, sp, args=(ATTENTION_CASES, dit_cases), sp_size=sp)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    ("sp", "heads", "expected"),
    [(8, 12, (4, 2)), (3, 2, (1, 3)), (4, 2, (2, 2)), (2, 2, (2, 1)), (6, 4, (2, 3)),
     (8, 40, (8, 1)), (1, 5, (1, 1)), (5, 40, (5, 1)), (7, 40, (1, 7))],
)  # fmt: skip
def test_sp_degree_factors_into_largest_head_divisor_times_ring(sp, heads, expected):
    assert sp_factorisation(sp, heads) == expected


def test_local_seq_len_pads_up_to_a_multiple_of_sp():
    assert [local_seq_len(n, 4) for n in (1, 4, 5, 35)] == [1, 1, 2, 9]


@pytest.mark.parametrize("sp", SP_DEGREES)
def test_distributed_attention_matches_full_sequence_sdpa(sp: int):
    results = _run(sp)
    for index, case in enumerate(ATTENTION_CASES):
        expected = reference_attention(*attention_inputs(case))
        diff = max(_max_diff(rank["attention"][index], expected) for rank in results)
        ulysses, ring = sp_factorisation(sp, case[2])
        print(f"sp={sp} ulysses={ulysses} ring={ring} case={case}: max abs diff {diff:.3e}")
        assert diff <= TOL, (sp, case, diff)


@pytest.mark.parametrize("sp", SP_DEGREES)
def test_dit_forward_on_sp_ranks_matches_single_process(sp: int):
    results = _run(sp)
    for index, name in enumerate(DIT_CONFIGS):
        for latent_index, latent in enumerate(LATENT_SIZES):
            with torch.no_grad():
                expected = _dit(name)(*_dit_inputs(name, latent))
            diff = max(_max_diff(rank["dit"][index][latent_index], expected) for rank in results)
            print(f"sp={sp} {name} latent={latent}: max abs diff {diff:.3e}")
            assert diff <= TOL, (sp, name, latent, diff)


def test_eight_ranks_with_twelve_heads_match_one_process():
    """SP=8 for a 12-head model (Wan2.1-1.3B's count): Ulysses 4 x ring 2 on 8 CPU ranks, the
    layout the 8-GPU issue runs; 35 tokens leave 5 padding slots on the last ranks."""
    assert sp_factorisation(8, 12) == (4, 2)
    name = "t2v-12-heads"
    latent = LATENT_SIZES[0]
    attention_case = (1, 37, 12, 8)
    dit_case = (_dit(name).constructor_config, _dit(name).state_dict(), [_dit_inputs(name, latent)])
    results = run_on_ranks(
        sequence_parallel_checks, 8, args=([attention_case], [dit_case]), sp_size=8
    )
    expected = reference_attention(*attention_inputs(attention_case))
    assert max(_max_diff(rank["attention"][0], expected) for rank in results) <= TOL
    with torch.no_grad():
        expected = _dit(name)(*_dit_inputs(name, latent))
    assert max(_max_diff(rank["dit"][0][0], expected) for rank in results) <= TOL


def test_ulysses_groups_are_consecutive_sp_ranks_and_ring_groups_strided():
    groups = [rank["groups"] for rank in _run(4)]
    assert groups[1] == {1: ((1,), (0, 1, 2, 3)), 2: ((0, 1), (1, 3)), 4: ((0, 1, 2, 3), (1,))}
    assert groups[2][2] == ((2, 3), (0, 2))
