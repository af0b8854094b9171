"""``enable_torch_compile``: the DiT's blocks compiled in place give the eager result.

One real Inductor compile of a tiny DiT on CPU (~30 s on two cores): fp32, within 1e-5 of
eager. Traced code runs PyTorch's chains, not the Triton kernels (Inductor fuses those
itself). The pipeline test only checks the wiring (which modules get compiled).
"""

from __future__ import annotations

import pytest
import torch

from fastvideo import VideoGenerator
from fastvideo.layers import fused_ops
from fastvideo.models.compile import compile_blocks
from fastvideo.testing.tiny_wan import tiny_dit, tiny_dit_inputs


def test_compiled_blocks_equal_eager():
    model = tiny_dit()
    latents, timestep, text = tiny_dit_inputs()
    with torch.inference_mode():
        eager = model(latents, timestep, text)

    assert compile_blocks(model) == 2
    with torch.inference_mode():
        compiled = model(latents, timestep, text)
    assert (compiled - eager).abs().max().item() <= 1e-5


def test_compiled_blocks_with_sliding_tile_attention_equal_eager():
    """STA inside compiled blocks: its plan lookup, the q/k scatter into its layout and
    FlexAttention traced together (~17 s on two cores)."""
    from fastvideo.attention.selector import forced_attention_backend
    from fastvideo.attention.sta_mask import SlidingTileConfig

    with forced_attention_backend("SLIDING_TILE_ATTN", SlidingTileConfig((1, 2, 2), (3, 1, 3), 16)):
        model = tiny_dit()
    latents, timestep, text = tiny_dit_inputs()
    with torch.inference_mode():
        eager = model(latents, timestep, text)
        assert compile_blocks(model) == 2
        compiled = model(latents, timestep, text)
    assert (compiled - eager).abs().max().item() <= 1e-5


def test_traced_code_takes_the_pytorch_chain_even_with_kernels_forced():
    @torch.compile(backend="eager", fullgraph=True)
    def decision(x: torch.Tensor) -> torch.Tensor:
        return x + float(fused_ops._use_kernels(x))

    x = torch.zeros(1)
    with fused_ops.fused_kernels(True):
        assert fused_ops._use_kernels(x)  # eager: forced on
        assert decision(x).item() == 0.0  # traced: off


def test_enable_torch_compile_compiles_the_transformer_blocks_only(tiny_t2v):
    generator = VideoGenerator.from_pretrained(tiny_t2v, device="cpu", enable_torch_compile=True)
    try:
        modules = generator.pipeline.modules
        blocks = modules["transformer"].blocks
        assert len(blocks) > 0
        assert all(block._compiled_call_impl is not None for block in blocks)
        vae_modules = list(modules["vae"].modules())
        assert all(getattr(m, "_compiled_call_impl", None) is None for m in vae_modules)
    finally:
        generator.close()


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_enable_torch_compile_must_be_a_bool(tiny_t2v, value):
    with pytest.raises(ValueError, match="enable_torch_compile must be True or False"):
        VideoGenerator.from_pretrained(tiny_t2v, device="cpu", enable_torch_compile=value)
