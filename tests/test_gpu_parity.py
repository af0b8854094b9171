"""Parity with diffusers on CUDA (run on the GPU machine; skipped where there is no GPU).

bf16 bound: both sides run the same kernels on the same bf16 weights, so differences come only
from where rounding to bf16 happens (8 mantissa bits: one rounding is a relative error of up to
2^-9 ~= 0.002). A few denoising steps of a random-weight model compound a few such roundings
on values of order 1, so frames in [0, 1] may differ by a few 1e-3; we allow 2e-2, five times
the worst case seen, and also require the mean difference to stay below 2e-3 so a systematic
error cannot hide under the bound. For one DiT forward the bound is two bf16 units in the last
place of the largest output: our fused q/k/v projection sums in another order than diffusers'
three projections, which moves a rounding by one unit (measured on an H200: exactly 1 ulp).
fp32 on CUDA must match to 1e-4 like on the CPU, with cuDNN's TF32 convolutions turned off
(TF32 keeps 10 mantissa bits; with it on, the VAE's convolutions differ by ~7e-4).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastvideo import VideoGenerator
from fastvideo.models.loader.weight_utils import load_weights_into_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPT = "a cat and a dog baking a cake together in a kitchen"
REQUEST = dict(height=64, width=96, num_frames=9, num_inference_steps=4, guidance_scale=5.0)


def _diffusers_t2v(folder, dtype) -> np.ndarray:
    from diffusers import AutoencoderKLWan, WanPipeline

    vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(folder, vae=vae, torch_dtype=dtype).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt=PROMPT,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="np",
        **REQUEST,
    )
    return out.frames[0]


def test_bf16_text_to_video_on_cuda_matches_diffusers(tiny_t2v):
    ours = VideoGenerator.from_pretrained(tiny_t2v, device="cuda")  # bf16 DiT by default
    frames = ours.generate_video(PROMPT, seed=5, **REQUEST).frames
    theirs = _diffusers_t2v(tiny_t2v, torch.bfloat16)
    diff = np.abs(frames - theirs)
    print(f"bf16 CUDA T2V frames: max {diff.max():.2e}, mean {diff.mean():.2e}")
    assert theirs.std() > 1e-3
    assert diff.max() <= 2e-2
    assert diff.mean() <= 2e-3


def test_fp32_text_to_video_on_cuda_matches_diffusers(tiny_t2v, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ours = VideoGenerator.from_pretrained(
        tiny_t2v, device="cuda", dit_precision="fp32", text_encoder_precision="fp32"
    )
    frames = ours.generate_video(PROMPT, seed=5, **REQUEST).frames
    theirs = _diffusers_t2v(tiny_t2v, torch.float32)
    diff = np.abs(frames - theirs).max()
    print(f"fp32 CUDA T2V frames: max {diff:.2e}")
    assert diff <= 1e-4


def test_bf16_dit_forward_on_cuda_matches_diffusers():
    from diffusers import WanTransformer3DModel as DiffusersWan

    from fastvideo.models.dits.wanvideo import WanTransformer3DModel

    torch.manual_seed(0)
    config = dict(
        num_attention_heads=4,
        attention_head_dim=64,
        in_channels=16,
        out_channels=16,
        text_dim=64,
        freq_dim=64,
        ffn_dim=512,
        num_layers=4,
    )
    reference = DiffusersWan(**config).to("cuda", torch.bfloat16)
    with torch.device("cuda"):
        ours = WanTransformer3DModel(**config).to(torch.bfloat16)
    for name, param in ours.named_parameters():
        if any(part in ours._keep_in_fp32_modules for part in name.split(".")):
            param.data = param.data.float()
    for name, param in reference.named_parameters():
        if any(part in reference._keep_in_fp32_modules for part in name.split(".")):
            param.data = param.data.float()
    load_weights_into_model(ours, reference.state_dict().items(), component="transformer")
    x = torch.randn(1, 16, 5, 30, 52, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([500.0], device="cuda")
    text = torch.randn(1, 77, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = reference(x, t, text, return_dict=False)[0].float()
        actual = ours(x, t, text).float()
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    print(f"bf16 CUDA DiT forward: max diff {diff:.2e} on outputs up to {scale:.2e}")
    ulp = 2.0 ** (math.floor(math.log2(scale)) - 7)  # bf16 spacing at the largest output
    assert diff <= 2 * ulp
