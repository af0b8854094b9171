"""Triton kernels for the memory-bound steps of a DiT block, one pass over the activations each.

Each replaces a chain of PyTorch elementwise ops that materialises float32 copies of the whole
activation several times (the DiT's "everything but attention and matmuls" time). Numerics
follow the unfused chain: statistics and arithmetic in float32, rounding to the activation
dtype exactly where the chain rounds. Call them through ``fastvideo.layers.fused_ops``, which
checks layouts and falls back to PyTorch where a kernel does not apply (CPU, autograd,
``torch.compile``, tensor parallelism).

Importing this module needs ``triton``. With ``TRITON_INTERPRET=1`` set before the import the
kernels run on CPU tensors through Triton's interpreter, which is how the CPU test suite
checks them against the PyTorch chain.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _jit_for_any(*names: str):
    """``triton.jit`` that does not specialise the named integer arguments on their
    alignment (Triton compiles a variant per "divisible by 16" pattern by default): sizes and
    strides that change with the video's resolution then reuse one compiled kernel instead of
    compiling again, seconds each, at the first request of every new resolution."""
    try:
        return triton.jit(do_not_specialize_on_alignment=names)
    except TypeError:  # a Triton without the option
        return triton.jit


@_jit_for_any("rows_per_batch")
def _layer_norm_modulate_kernel(
    x_ptr,
    out_ptr,
    weight_ptr,
    bias_ptr,
    shift_ptr,
    scale_ptr,
    rows_per_batch,
    dim,
    mod_batch_stride,
    eps,
    HAS_AFFINE: tl.constexpr,
    HAS_MODULATION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride overflows int32 at 14B sizes
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(x_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / dim
    centred = tl.where(mask, x - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / dim
    y = centred * tl.rsqrt(var + eps)
    if HAS_AFFINE:
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = y * weight + bias
    if HAS_MODULATION:
        batch = row // rows_per_batch
        scale = tl.load(scale_ptr + batch * mod_batch_stride + cols, mask=mask, other=0.0)
        shift = tl.load(shift_ptr + batch * mod_batch_stride + cols, mask=mask, other=0.0)
        y = y * (1.0 + scale.to(tl.float32)) + shift.to(tl.float32)
    tl.store(out_ptr + row * dim + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def layer_norm_modulate(
    x: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(layer_norm(x.float()) [* weight + bias]) [* (1 + scale) + shift]`` cast to x.dtype.

    ``x``: contiguous (B, S, D). ``shift`` / ``scale``: (B or 1, 1, D) with unit last stride,
    equal batch strides (chunks of one (B, k, D) table are). ``weight`` / ``bias``: (D,)."""
    batch, rows, dim = x.shape
    out = torch.empty_like(x)
    has_mod = shift is not None
    mod_stride = 0
    if has_mod and shift.shape[0] > 1:
        mod_stride = shift.stride(0)
    block = triton.next_power_of_2(dim)
    _layer_norm_modulate_kernel[(batch * rows,)](
        x,
        out,
        weight if weight is not None else x,
        bias if bias is not None else x,
        shift if has_mod else x,
        scale if has_mod else x,
        rows,
        dim,
        mod_stride,
        eps,
        HAS_AFFINE=weight is not None,
        HAS_MODULATION=has_mod,
        BLOCK=block,
        num_warps=_warps(block),
    )
    return out


@_jit_for_any("rows_per_batch")
def _gated_residual_kernel(
    x_ptr,
    y_ptr,
    gate_ptr,
    out_ptr,
    rows_per_batch,
    dim,
    gate_batch_stride,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride overflows int32 at 14B sizes
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(x_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
    batch = row // rows_per_batch
    gate = tl.load(gate_ptr + batch * gate_batch_stride + cols, mask=mask, other=0.0)
    out = x + y * gate.to(tl.float32)
    tl.store(out_ptr + row * dim + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``(x.float() + y.float() * gate).to(x.dtype)``: x, y contiguous (B, S, D), gate
    (B or 1, 1, D) float32 with unit last stride."""
    batch, rows, dim = x.shape
    out = torch.empty_like(x)
    gate_stride = gate.stride(0) if gate.shape[0] > 1 else 0
    block = min(triton.next_power_of_2(dim), 2048)
    grid = (batch * rows, triton.cdiv(dim, block))
    _gated_residual_kernel[grid](
        x, y, gate, out, rows, dim, gate_stride, BLOCK=block, num_warps=_warps(block)
    )
    return out


@_jit_for_any("rows_per_batch", "out_rows_per_batch")
def _rms_norm_rotary_kernel(
    src_ptr,
    out_ptr,
    weight_ptr,
    cos_ptr,
    sin_ptr,
    out_rows_ptr,
    src_row_stride,
    rows_per_batch,
    out_rows_per_batch,
    inner,
    half_head_dim,
    eps,
    SCATTER: tl.constexpr,
    BLOCK_PAIRS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride overflows int32 at 14B sizes
    token = row % rows_per_batch
    out_row = row
    if SCATTER:  # the token's row in an attention backend's own layout
        out_row = (row // rows_per_batch) * out_rows_per_batch + tl.load(out_rows_ptr + token)
    pairs = tl.arange(0, BLOCK_PAIRS)
    mask = pairs < inner // 2
    src = src_ptr + row * src_row_stride + 2 * pairs
    even = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    odd = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(even * even + odd * odd, axis=0) / inner + eps)
    w_even = tl.load(weight_ptr + 2 * pairs, mask=mask, other=0.0).to(tl.float32)
    w_odd = tl.load(weight_ptr + 2 * pairs + 1, mask=mask, other=0.0).to(tl.float32)
    # RMSNorm's output is rounded to the activation dtype before the rotation reads it.
    dtype = out_ptr.dtype.element_ty
    even = (even * rstd * w_even).to(dtype).to(tl.float32)
    odd = (odd * rstd * w_odd).to(dtype).to(tl.float32)
    freq = token * half_head_dim + pairs % half_head_dim
    cos = tl.load(cos_ptr + freq, mask=mask, other=0.0)
    sin = tl.load(sin_ptr + freq, mask=mask, other=0.0)
    dst = out_ptr + out_row * inner + 2 * pairs
    tl.store(dst, (even * cos - odd * sin).to(dtype), mask=mask)
    tl.store(dst + 1, (even * sin + odd * cos).to(dtype), mask=mask)


def rms_norm_rotary(
    src: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    eps: float,
    out: torch.Tensor | None = None,
    out_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMSNorm over all heads' features of each token, then the interleaved-pair rotation by
    float32 angles, as ``apply_interleaved_rotary(rms_norm(src).unflatten(2, (H, -1)), cos, sin)``.

    ``src``: (B, S, H*D) with unit last stride (a column slice of the fused q/k/v output is
    fine); ``weight``: (H*D,); ``cos`` / ``sin``: contiguous float32 (S, D/2). Returns a
    contiguous (B, S, H, D) tensor in src's dtype, or writes token ``s`` to row
    ``out_rows[s]`` of the given contiguous (B, L, H, D) ``out``."""
    batch, rows, inner = src.shape
    if out is None:
        out = torch.empty(
            batch, rows, num_heads, inner // num_heads, dtype=src.dtype, device=src.device
        )
    block = triton.next_power_of_2(inner // 2)
    _rms_norm_rotary_kernel[(batch * rows,)](
        src,
        out,
        weight,
        cos,
        sin,
        src if out_rows is None else out_rows,
        src.stride(1),
        rows,
        out.shape[1],
        inner,
        inner // num_heads // 2,
        eps,
        SCATTER=out_rows is not None,
        BLOCK_PAIRS=block,
        num_warps=_warps(block),
    )
    return out


# numel keeps its alignment specialisation: the masked loads vectorise only with it (3x).
@triton.jit
def _gelu_tanh_inplace_kernel(x_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    # tanh(u) = 1 - 2 / (exp(2u) + 1); |u| > 15 is +-1 in float32 anyway, and clamping keeps
    # exp finite. Its absolute error near 0 (a float32 unit) is harmless where 1 is added.
    inner = tl.minimum(tl.maximum(inner, -15.0), 15.0)
    tanh = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
    tl.store(x_ptr + offsets, (0.5 * x * (1.0 + tanh)).to(x_ptr.dtype.element_ty), mask=mask)


def gelu_tanh_(x: torch.Tensor) -> torch.Tensor:
    """``F.gelu(x, approximate="tanh")`` computed in float32 and written over contiguous x."""
    numel = x.numel()
    block = 4096
    _gelu_tanh_inplace_kernel[(triton.cdiv(numel, block),)](x, numel, BLOCK=block, num_warps=8)
    return x


# Sizes only: the strides' alignment lets Triton vectorise the loads, and for the VAE's
# channel counts (multiples of 16) it does not change with the resolution.
@_jit_for_any("channels", "frames", "height", "width", "first_frame", "out_frames")
def _channel_rms_norm_silu_kernel(
    x_ptr,
    gamma_ptr,
    out_ptr,
    channels,
    frames,
    height,
    width,
    xs_b,
    xs_c,
    xs_t,
    xs_h,
    xs_w,
    os_b,
    os_c,
    os_t,
    os_h,
    os_w,
    os_shift,
    first_frame,
    out_frames,
    scale,
    eps,
    NORM: tl.constexpr,
    APPLY_SILU: tl.constexpr,
    SHIFTS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)
    pos = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    pos_mask = pos < frames * height * width
    # Positions are row-major (t, h, w) whatever the strides: x and out may be permuted
    # views, a channels-last tensor or the interior of a padded buffer.
    w = pos % width
    h = (pos // width) % height
    t = pos // (width * height)
    x_base = x_ptr + batch * xs_b + (t * xs_t + h * xs_h + w * xs_w)[None, :]
    out_spatial = out_ptr + batch * os_b + (h * os_h + w * os_w)[None, :]
    denom = tl.full([BLOCK_S], 1.0, dtype=tl.float32)
    if NORM:
        # Pass 1: each position's sum of squares over the channels. Pass 2 reads the same
        # tile again (from L2) and writes the result; every read of a position precedes its
        # writes within this program, so out may be x.
        total = tl.zeros([BLOCK_S], dtype=tl.float32)
        for start in range(0, channels, BLOCK_C):
            ch = (start + tl.arange(0, BLOCK_C)).to(tl.int64)  # ch * stride: int64 offsets
            mask = (ch[:, None] < channels) & pos_mask[None, :]
            x = tl.load(x_base + ch[:, None] * xs_c, mask=mask, other=0.0).to(tl.float32)
            total += tl.sum(x * x, axis=0)
        # F.normalize: x / max(||x||, eps).
        denom = tl.maximum(tl.sqrt(total), eps)
    dtype = out_ptr.dtype.element_ty
    for start in range(0, channels, BLOCK_C):
        ch = (start + tl.arange(0, BLOCK_C)).to(tl.int64)  # ch * stride: int64 offsets
        mask = (ch[:, None] < channels) & pos_mask[None, :]
        x = tl.load(x_base + ch[:, None] * xs_c, mask=mask, other=0.0)
        y = x.to(tl.float32)
        if NORM:
            gamma = tl.load(gamma_ptr + ch, mask=ch < channels, other=0.0).to(tl.float32)
            # The module's rounding order: normalised (activation dtype), * scale, * gamma.
            y = (y / denom[None, :]).to(dtype).to(tl.float32)
            y = (y * scale).to(dtype).to(tl.float32) * gamma[:, None]
            y = y.to(dtype).to(tl.float32)
        if APPLY_SILU:
            y = y / (1.0 + tl.exp(-y))
        y = y.to(dtype)
        # Input frame t is frame first_frame + t of the output sequence; with SHIFTS = 3 it
        # is also written shifted: output frame f - s, channel block s (s = 0, 1, 2), the
        # three frames a temporal kernel of 3 reads, stacked along channels.
        for shift in tl.static_range(SHIFTS):
            frame = first_frame + t - shift
            ok = (frame >= 0) & (frame < out_frames)
            dst = out_spatial + (frame * os_t + shift * os_shift)[None, :] + ch[:, None] * os_c
            tl.store(dst, y, mask=mask & ok[None, :])


def channel_rms_norm_silu(
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    scale: float,
    eps: float,
    silu: bool,
    out: torch.Tensor,
    shift_stride: int = 0,
    first_frame: int = 0,
) -> torch.Tensor:
    """``silu(F.normalize(x, dim=1) * scale * gamma)`` (without the norm when ``gamma`` is
    None, without the SiLU unless ``silu``) for (B, C, T, H, W) ``x``, written to ``out``: x's
    shape, or (B, C, T', H, W) taking x's frames at ``first_frame``. With ``shift_stride``,
    out's frame f also receives frames f + 1 and f + 2 at ``shift_stride`` and twice that
    (``CausalConv3d``'s stacked-frame buffer). Any strides; ``out`` may be ``x``."""
    batch, channels, frames, height, width = x.shape
    block_s = 128
    grid = (triton.cdiv(frames * height * width, block_s), batch)
    _channel_rms_norm_silu_kernel[grid](
        x,
        x if gamma is None else gamma,
        out,
        channels,
        frames,
        height,
        width,
        *x.stride(),
        *out.stride(),
        shift_stride,
        first_frame,
        out.shape[2],
        scale,
        eps,
        NORM=gamma is not None,
        APPLY_SILU=silu,
        SHIFTS=3 if shift_stride else 1,
        BLOCK_C=32,
        BLOCK_S=block_s,
        num_warps=4,
    )
    return out
