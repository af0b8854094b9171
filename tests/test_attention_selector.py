"""Backend selection: automatic choice, overrides, and clear errors when a backend can't run."""

from __future__ import annotations

import pytest
import torch

from fastvideo.attention import DistributedAttention, LocalAttention
from fastvideo.attention.backends.abstract import _Backend
from fastvideo.attention.selector import ENV_VAR, forced_attention_backend
from fastvideo.fastvideo_args import FastVideoArgs

ALL = (_Backend.SLIDING_TILE_ATTN, _Backend.FLASH_ATTN, _Backend.TORCH_SDPA)


def test_automatic_choice_skips_unusable_and_opt_in_backends(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    attn = DistributedAttention(num_heads=2, head_size=8, supported_attention_backends=ALL)
    # No flash_attn package and no GPU here; sliding-tile is only used when asked for.
    assert attn.backend.get_enum() is _Backend.TORCH_SDPA


def test_sdpa_backend_computes_softmax_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 5, 2, 8), torch.randn(1, 7, 2, 8), torch.randn(1, 7, 2, 8)
    out = LocalAttention(num_heads=2, head_size=8)(q, k, v)
    weights = torch.softmax(torch.einsum("bshd,bthd->bhst", q, k) / 8**0.5, dim=-1)
    torch.testing.assert_close(out, torch.einsum("bhst,bthd->bshd", weights, v))


def test_environment_variable_naming_an_unavailable_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "flash_attn")
    with pytest.raises(ValueError, match=f"{ENV_VAR}=FLASH_ATTN cannot be used: the flash_attn"):
        LocalAttention(num_heads=2, head_size=8)


def test_environment_variable_with_unknown_name_lists_backends(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "warp_speed")
    with pytest.raises(ValueError, match="TORCH_SDPA"):
        LocalAttention(num_heads=2, head_size=8)


def test_requested_kernel_outside_the_layer_list_is_rejected(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with (
        forced_attention_backend("FLASH_ATTN"),
        pytest.raises(ValueError, match="supports only"),
    ):
        LocalAttention(
            num_heads=2, head_size=8, supported_attention_backends=(_Backend.TORCH_SDPA,)
        )


def test_sliding_tile_asked_for_by_name_applies_where_listed_and_others_choose(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with forced_attention_backend("SLIDING_TILE_ATTN"):
        self_attn = DistributedAttention(num_heads=2, head_size=8, supported_attention_backends=ALL)
        # Like the DiT's cross-attention to text: a sparse video pattern does not apply.
        cross_attn = LocalAttention(
            num_heads=2, head_size=8, supported_attention_backends=(_Backend.TORCH_SDPA,)
        )
    assert self_attn.backend.get_enum() is _Backend.SLIDING_TILE_ATTN
    assert (self_attn.impl.config.tile, self_attn.impl.config.window) == ((6, 8, 8), (3, 3, 3))
    assert cross_attn.backend.get_enum() is _Backend.TORCH_SDPA


def test_fastvideo_args_override_wins_over_environment(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "FLASH_ATTN")
    args = FastVideoArgs.from_kwargs("unused", attention_backend="torch_sdpa")
    with forced_attention_backend(args.attention_backend):
        attn = LocalAttention(num_heads=2, head_size=8)
    assert attn.backend.get_enum() is _Backend.TORCH_SDPA


def test_fastvideo_args_rejects_unknown_backend_name():
    with pytest.raises(ValueError, match="attention_backend='fast'"):
        FastVideoArgs.from_kwargs("unused", attention_backend="fast")
