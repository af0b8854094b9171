"""Rank functions for the GPU sequence-parallel tests (spawned ranks must import them)."""

from __future__ import annotations

import torch

DIT_CONFIG = dict(
    num_attention_heads=12,
    attention_head_dim=128,  # Wan's head size
    in_channels=16,
    out_channels=16,
    text_dim=64,
    freq_dim=64,
    ffn_dim=1024,
    num_layers=4,
)
LATENT = (1, 16, 5, 30, 54)  # 5 x 15 x 27 = 2025 tokens: divides by neither 2 nor 4


def build_bf16_dit(device: str, heads: int = 12):
    from fastvideo.models.dits.wanvideo import WanTransformer3DModel
    from fastvideo.models.loader.weight_utils import keep_modules_in_fp32

    torch.manual_seed(0)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**{**DIT_CONFIG, "num_attention_heads": heads})
    finally:
        torch.set_default_dtype(saved)
    keep_modules_in_fp32(model)
    return model.eval().requires_grad_(False)


def dit_inputs(device: str):
    gen = torch.Generator("cpu").manual_seed(1)
    x = torch.randn(*LATENT, generator=gen).to(device, torch.bfloat16)
    text = torch.randn(1, 77, DIT_CONFIG["text_dim"], generator=gen).to(device, torch.bfloat16)
    return x, torch.tensor([500.0], device=device), text


def sp_dit_forward(heads: int) -> torch.Tensor:
    device = f"cuda:{torch.cuda.current_device()}"
    model = build_bf16_dit(device, heads)
    x, t, text = dit_inputs(device)
    with torch.inference_mode():
        return model(x, t, text).float().cpu()
