"""The fused Triton kernels (``fastvideo/layers/triton_kernels.py``) equal the PyTorch chains
they replace.

On a machine without a GPU the kernels run on CPU tensors through Triton's interpreter
(``TRITON_INTERPRET=1``, set by ``conftest.py``), in float32: within 1e-5 of
the chain, op by op and for a whole DiT forward. On a GPU the same tests run the compiled
kernels, plus a bf16 check.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastvideo.layers import fused_ops
from fastvideo.layers.fused_ops import fused_kernels
from fastvideo.models.dits.wan_embeddings import WanRotaryPosEmbed
from fastvideo.testing.tiny_wan import tiny_dit, tiny_dit_inputs

pytest.importorskip("triton", reason="the kernels need triton (a dev dependency on Linux x86-64)")
CUDA = torch.cuda.is_available()
assert CUDA or os.environ.get("TRITON_INTERPRET") == "1", "conftest.py sets TRITON_INTERPRET"
DEVICE = "cuda" if CUDA else "cpu"


def both(fn, *args, **kwargs):
    """fn's result with the kernels forced on, and with the PyTorch chain."""
    with fused_kernels(True):
        fused = fn(*args, **kwargs)
    with fused_kernels(False):
        chain = fn(*args, **kwargs)
    return fused, chain


def assert_close(fused: torch.Tensor, chain: torch.Tensor, atol: float = 1e-5) -> None:
    assert fused.shape == chain.shape and fused.dtype == chain.dtype
    assert not fused.isnan().any()
    diff = (fused.float() - chain.float()).abs().max().item()
    assert diff <= atol, diff


def test_kernels_are_used_only_where_they_apply(monkeypatch):
    calls = []
    kernels = fused_ops._kernels()
    real = kernels.gated_residual

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(kernels, "gated_residual", spy)
    x, gate = torch.randn(1, 4, 8), torch.ones(1, 1, 8)
    fused_ops.gated_residual(x, x, gate)
    assert calls == []  # CPU tensors take the PyTorch chain unless forced
    x, gate = x.to(DEVICE), gate.to(DEVICE)
    with fused_kernels(True):
        fused_ops.gated_residual(x, x, gate)
        assert len(calls) == 1
        grad_x = x.clone().requires_grad_()
        fused_ops.gated_residual(grad_x, x, gate)  # autograd: the chain
        assert len(calls) == 1
        fused_ops.gated_residual(x, x, gate.double())  # not a float32 gate: the chain
        assert len(calls) == 1
        spied_ln = []
        monkeypatch.setattr(kernels, "layer_norm_modulate", lambda *a: spied_ln.append(1))
        table = torch.randn(2, 6, 8, device=DEVICE)
        x2 = torch.randn(2, 4, 8, device=DEVICE)
        # shift for two batch rows, scale for one: the chain broadcasts, the kernel cannot.
        out = fused_ops.layer_norm_scale_shift(x2, 1e-6, table[:, 0:1], table[:1, 1:2])
        assert spied_ln == [] and out.shape == x2.shape
        weight = torch.ones(6, device=DEVICE)  # wrong width: the chain's own error
        with pytest.raises(RuntimeError):
            fused_ops.layer_norm_scale_shift(x2, 1e-6, weight=weight, bias=weight)
        assert spied_ln == []
    with fused_kernels(False):
        fused_ops.gated_residual(x, x, gate)
        assert len(calls) == 1
    monkeypatch.setenv("FASTVIDEO_FUSED_KERNELS", "0")
    fused_ops.gated_residual(x, x, gate)
    assert len(calls) == 1
    if CUDA:  # CUDA tensors take the kernels by default
        monkeypatch.delenv("FASTVIDEO_FUSED_KERNELS")
        fused_ops.gated_residual(x, x, gate)
        assert len(calls) == 2


@pytest.mark.parametrize("batch,rows,dim", [(2, 37, 96), (1, 50, 100), (3, 5, 1536)])
@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_scale_shift(batch, rows, dim, affine):
    gen = torch.Generator().manual_seed(dim)
    x = (torch.randn(batch, rows, dim, generator=gen) * 3 + 1).to(DEVICE)
    table = torch.randn(batch, 6, dim, generator=gen).to(DEVICE)
    shift, scale = table[:, 0:1], table[:, 1:2]  # strided chunks, as the DiT block makes them
    weight = bias = None
    if affine:
        weight = torch.randn(dim, generator=gen).to(DEVICE)
        bias = torch.randn(dim, generator=gen).to(DEVICE)
    fused, chain = both(fused_ops.layer_norm_scale_shift, x, 1e-6, shift, scale, weight, bias)
    assert_close(fused, chain)
    fused, chain = both(fused_ops.layer_norm_scale_shift, x, 1e-6, weight=weight, bias=bias)
    assert_close(fused, chain)
    # A (1, 1, D) modulation broadcast over the batch.
    fused, chain = both(fused_ops.layer_norm_scale_shift, x, 1e-6, shift[:1], scale[:1])
    assert_close(fused, chain)


@pytest.mark.parametrize("batch,rows,dim", [(2, 37, 96), (1, 9, 3000)])
def test_gated_residual(batch, rows, dim):
    gen = torch.Generator().manual_seed(rows)
    x, y = (torch.randn(batch, rows, dim, generator=gen).to(DEVICE) for _ in range(2))
    gate = torch.randn(batch, 6, dim, generator=gen).to(DEVICE)[:, 2:3]
    assert_close(*both(fused_ops.gated_residual, x, y, gate))
    assert_close(*both(fused_ops.gated_residual, x, y, gate[:1]))


@pytest.mark.parametrize("heads,head_dim,grid", [(2, 24, (2, 3, 5)), (12, 128, (3, 4, 4))])
def test_rms_norm_rotary_on_a_fused_qkv_slice(heads, head_dim, grid):
    gen = torch.Generator().manual_seed(heads)
    inner = heads * head_dim
    rows = grid[0] * grid[1] * grid[2]
    qkv = torch.randn(2, rows, 3 * inner, generator=gen).to(DEVICE)
    q, k, _ = qkv.chunk(3, dim=-1)  # column slices: row stride 3 * inner
    weight = torch.randn(inner, generator=gen).to(DEVICE)
    cos, sin = WanRotaryPosEmbed(head_dim, 1024)(grid, torch.device(DEVICE))
    for src in (q, k):
        fused, chain = both(fused_ops.rms_norm_rotary, src, weight, 1e-6, cos, sin, heads)
        assert fused.shape == (2, rows, heads, head_dim) and fused.is_contiguous()
        assert_close(fused, chain)


def test_rms_norm_rotary_writes_an_attention_layout():
    """Tokens scattered to the rows a backend asks for, padding rows zero, kernel = chain."""
    from fastvideo.layers.fused_ops import TokenRows

    gen = torch.Generator().manual_seed(7)
    grid, heads, head_dim = (2, 3, 4), 2, 8
    rows = 24
    src = torch.randn(2, rows, heads * head_dim, generator=gen).to(DEVICE)
    weight = torch.randn(heads * head_dim, generator=gen).to(DEVICE)
    cos, sin = WanRotaryPosEmbed(head_dim, 1024)(grid, torch.device(DEVICE))
    order = torch.randperm(rows + 5, generator=gen)
    arrangement = TokenRows(order[:rows].to(DEVICE), order[rows:].to(DEVICE), rows + 5)
    fused, chain = both(fused_ops.rms_norm_rotary, src, weight, 1e-6, cos, sin, heads, arrangement)
    assert_close(fused, chain)
    with fused_kernels(False):
        plain = fused_ops.rms_norm_rotary(src, weight, 1e-6, cos, sin, heads)
    assert torch.equal(chain[:, arrangement.rows], plain)
    assert not fused[:, arrangement.padding].any()
    short = TokenRows(arrangement.rows[:-1], arrangement.padding, rows + 5)
    with pytest.raises(ValueError, match="places 23 tokens, the input has 24"):
        fused_ops.rms_norm_rotary(src, weight, 1e-6, cos, sin, heads, short)


def test_sliding_tile_dit_with_and_without_kernels():
    """The DiT with sliding-tile attention: q and k written straight into its layout."""
    from fastvideo.attention.selector import forced_attention_backend
    from fastvideo.attention.sta_mask import SlidingTileConfig

    with forced_attention_backend("SLIDING_TILE_ATTN", SlidingTileConfig((1, 2, 2), (3, 1, 3), 16)):
        model = tiny_dit(DEVICE)
    latents, timestep, text = tiny_dit_inputs(batch=2, device=DEVICE)
    with torch.inference_mode():
        fused, chain = both(model, latents, timestep, text)
    assert_close(fused, chain)


def test_gelu_tanh_in_place():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, 1000, generator=gen).to(DEVICE) * 3
    x[0, 0, :6] = torch.tensor([0.0, 1e-6, -1e-6, 40.0, -40.0, 1e4])
    chain = torch.nn.functional.gelu(x, approximate="tanh")
    with fused_kernels(True):
        fused = fused_ops.gelu_(x.clone(), "tanh")
        same = x.clone()
        assert fused_ops.gelu_(same, "tanh") is same  # written over its input
        strided = x.transpose(1, 2)  # not contiguous: the out-of-place chain
        assert fused_ops.gelu_(strided, "tanh") is not strided
        assert fused_ops.gelu_(x, "none") is not x  # erf GELU: the chain
    assert_close(fused, chain)


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize(
    "shape, channels_last",
    [((2, 40, 3, 5, 7), False), ((1, 96, 2, 6, 9), True), ((3, 33, 4, 6), False)],
    ids=["ncthw", "channels-last-3d", "per-frame-nchw"],
)
def test_channel_rms_norm_silu(shape, channels_last, silu):
    """The VAE's norm (+ SiLU): channel counts that are and are not a multiple of the
    kernel's channel block, both memory layouts, out of place and in place."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(*shape, generator=gen).to(DEVICE) * 2
    x[0, :, 0, 0] = 0.0  # a zero vector: F.normalize's eps keeps it 0, not NaN
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    gamma = torch.randn(shape[1], *([1] * (len(shape) - 2)), generator=gen).to(DEVICE)
    scale = shape[1] ** 0.5
    fused, chain = both(fused_ops.channel_rms_norm, x, gamma, scale, silu=silu)
    assert_close(fused, chain)
    assert fused.stride() == x.stride()
    with fused_kernels(True):
        same = x.clone(memory_format=torch.preserve_format)
        assert fused_ops.channel_rms_norm(same, gamma, scale, silu=silu, inplace=True) is same
    assert_close(same, chain)


@pytest.mark.parametrize("chunk_frames, channels_last, batch", [(1, False, 1), (2, True, 2)])
def test_vae_decode_with_and_without_kernels(chunk_frames, channels_last, batch, monkeypatch):
    """The fused norm writes into the causal convolutions' stacked inputs: frame by frame
    (single-frame chunks topping up the cache) and in chunks, in both memory layouts. On a
    GPU in true fp32: with TF32 the 2D and 3D convolutions would round differently."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    from fastvideo.models.vaes.wanvae import AutoencoderKLWan
    from fastvideo.testing.tiny_wan import TinyWanConfig

    c = TinyWanConfig()
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**c.vae_kwargs()).to(DEVICE)
    vae.set_decode_chunk_frames(chunk_frames)
    vae.use_channels_last(channels_last)
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(batch, c.z_dim, 4, 4, 6, generator=gen).to(DEVICE)
    video = torch.randn(batch, 3, 9, 16, 24, generator=gen).to(DEVICE)
    stacked = []
    real = fused_ops._kernels().channel_rms_norm_silu

    def spy(*args):
        stacked.append(len(args) > 6 and bool(args[6]))  # shift_stride: the stacked path
        return real(*args)

    with torch.inference_mode(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused_ops._kernels(), "channel_rms_norm_silu", spy)
        fused, chain = both(vae.decode, z)
        assert_close(fused, chain)
        assert any(stacked)
        fused, chain = both(lambda v: vae.encode(v).mean, video)
        assert_close(fused, chain)


def test_whole_dit_forward_with_and_without_kernels():
    model = tiny_dit(DEVICE)
    latents, timestep, text = tiny_dit_inputs(batch=2, device=DEVICE)
    with torch.inference_mode():
        fused, chain = both(model, latents, timestep, text)
    assert_close(fused, chain)


@pytest.mark.skipif(not CUDA, reason="bf16 kernels are checked on a GPU")
def test_bf16_kernels_round_like_the_chain():
    """bf16 activations, float32 statistics and modulation: both sides compute a float32
    value and round it to bf16 once. Their float32 values differ by a few float32 units of the
    operands' magnitude (reduction order, FMA contraction), so the bf16 results agree to one
    bf16 unit of the result, plus that float32 slack where the sum cancels to near zero."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4096, 1536, generator=gen).cuda().bfloat16()
    y = torch.randn(1, 4096, 1536, generator=gen).cuda().bfloat16()
    table = torch.randn(1, 6, 1536, generator=gen).cuda()
    shift, scale, gate = table[:, 0:1], table[:, 1:2], table[:, 2:3]
    normed = torch.nn.functional.layer_norm(x.float(), (1536,), eps=1e-6)
    cases = (
        (
            both(fused_ops.layer_norm_scale_shift, x, 1e-6, shift, scale),
            (normed * (1 + scale)).abs() + shift.abs(),
        ),
        (both(fused_ops.gated_residual, x, y, gate), x.float().abs() + (y.float() * gate).abs()),
        (both(lambda t: fused_ops.gelu_(t.clone(), "tanh"), x), x.float().abs()),
    )
    for (fused, chain), magnitude in cases:
        bound = chain.float().abs() * 2**-7 + magnitude * 2**-20
        diff = (fused.float() - chain.float()).abs()
        assert (diff <= bound).all(), (diff - bound).max().item()
        assert (fused == chain).float().mean() > 0.99
