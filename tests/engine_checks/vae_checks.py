"""Rank functions for ``run_on_ranks`` that exercise the VAE's split decode, and the random
diffusers/ours VAE pair the VAE tests compare (spawned ranks import them by module name)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fastvideo.models.vaes.wanvae import AutoencoderKLWan


def decode_on_rank(
    config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    cases: Sequence[tuple[torch.Tensor, tuple[int, int, int, int] | None]],
) -> list[tuple[torch.Tensor, int]]:
    """Decode each ``(z, tiling)`` case on this rank with the default (SP) group.

    ``tiling`` is ``enable_tiling``'s arguments, or None to leave tiling off. Returns, per
    case, the video and how many tiles (or whole clips) this rank decoded itself.
    """
    vae = AutoencoderKLWan(**config).eval()
    vae.load_state_dict(state_dict, strict=True)
    calls = 0
    decode_one = vae._decode

    def counting_decode(z: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return decode_one(z)

    vae._decode = counting_decode  # instance attribute shadows the method
    results = []
    for z, tiling in cases:
        if tiling is None:
            vae.disable_tiling()
        else:
            vae.enable_tiling(*tiling)
        calls = 0
        with torch.no_grad():
            video = vae.decode(z)
        results.append((video, calls))
    return results


def random_vae_pair(config: dict):
    """A diffusers ``AutoencoderKLWan`` with random weights (norm gains and biases moved off
    their defaults, so a misplaced one shows) and ours loaded from its state_dict."""
    from diffusers import AutoencoderKLWan as DiffusersWanVAE

    torch.manual_seed(0)
    reference = DiffusersWanVAE(**config).eval()
    with torch.no_grad():
        for key, param in reference.named_parameters():
            if key.endswith("gamma"):
                param.uniform_(0.5, 1.5)
            elif key.endswith("bias"):
                param.normal_(0.0, 0.2)
    ours = AutoencoderKLWan(**config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours
