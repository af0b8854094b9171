"""DiT elementwise steps with a fused Triton kernel on CUDA and the PyTorch chain elsewhere.

Each function here is the reference chain in PyTorch ops (what the model computes on CPU, under
autograd and under ``torch.compile``, whose Inductor fuses the chain itself) and dispatches to
the one-pass kernel of ``triton_kernels`` where it applies: CUDA tensors in the layout the
kernel reads, no autograd, Triton installed. ``FASTVIDEO_FUSED_KERNELS=0`` turns the kernels
off; ``fused_kernels(True)`` forces them (tests run them on CPU through Triton's interpreter).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Iterator
from types import ModuleType

import torch
import torch.nn.functional as F

from fastvideo import envs
from fastvideo.layers.rotary import apply_interleaved_rotary

_forced: bool | None = None


@functools.cache
def _kernels() -> ModuleType | None:
    if importlib.util.find_spec("triton") is None:
        return None
    from fastvideo.layers import triton_kernels

    return triton_kernels


@contextlib.contextmanager
def fused_kernels(enabled: bool) -> Iterator[None]:
    """Force the kernels on (any device, given Triton) or off within the block."""
    global _forced
    saved, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = saved


def _use_kernels(*tensors: torch.Tensor | None) -> bool:
    present = [t for t in tensors if t is not None]
    if torch.compiler.is_compiling():  # first: traced code reads no environment
        return False
    if _forced is False or (_forced is None and not envs.FASTVIDEO_FUSED_KERNELS.get()):
        return False
    if _forced is None and not present[0].is_cuda:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return False
    return _kernels() is not None


def _on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it x's (x may live on another GPU)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _row_vector(t: torch.Tensor | None, batch: int, dim: int) -> bool:
    """A float32 (batch or 1, 1, dim) modulation vector with unit last stride."""
    return t is None or (
        t.dtype == torch.float32
        and t.ndim == 3
        and t.shape[0] in (1, batch)
        and t.shape[1:] == (1, dim)
        and t.stride(-1) == 1
    )


def layer_norm_scale_shift(
    x: torch.Tensor,
    eps: float,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(layer_norm(x.float(), weight, bias) * (1 + scale) + shift).to(x.dtype)`` over the last
    dim; without shift/scale just the float32 layer norm cast back. shift/scale: (B|1, 1, D)."""
    if (shift is None) != (scale is None):
        raise ValueError("shift and scale come together")
    if (
        _use_kernels(x, shift, scale, weight, bias)
        and x.ndim == 3
        and x.is_contiguous()
        and _row_vector(shift, x.shape[0], x.shape[2])
        and _row_vector(scale, x.shape[0], x.shape[2])
        and (shift is None or shift.shape[0] == scale.shape[0])
        and (shift is None or shift.stride(0) == scale.stride(0) or shift.shape[0] == 1)
        and (weight is None) == (bias is None)
        and (weight is None or weight.numel() == bias.numel() == x.shape[2])
        and (weight is None or (weight.is_contiguous() and bias.is_contiguous()))
    ):
        with _on_device(x):
            return _kernels().layer_norm_modulate(x, eps, weight, bias, shift, scale)
    y = F.layer_norm(
        x.float(),
        x.shape[-1:],
        weight.float() if weight is not None else None,
        bias.float() if bias is not None else None,
        eps,
    )
    if shift is not None:
        y = y * (1 + scale) + shift
    return y.to(x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``(x.float() + y.float() * gate).to(x.dtype)``: a residual branch added back, scaled by
    the float32 (B|1, 1, D) modulation gate."""
    if (
        _use_kernels(x, y, gate)
        and x.ndim == 3
        and x.shape == y.shape
        and x.is_contiguous()
        and y.is_contiguous()
        and _row_vector(gate, x.shape[0], x.shape[2])
    ):
        with _on_device(x):
            return _kernels().gated_residual(x, y, gate)
    return (x.float() + y.float() * gate).to(x.dtype)


def rms_norm_rotary(
    src: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    arrangement: TokenRows | None = None,
) -> torch.Tensor:
    """(B, S, H*D) -> RMSNorm over the H*D features (weight cast to src's dtype, as
    ``F.rms_norm`` gets it), heads split out, interleaved pairs rotated by float32 ``cos`` /
    ``sin`` of shape (1, S, 1, D/2): a (B, S, H, D) tensor in src's dtype.

    With ``arrangement``, token ``s`` lands in row ``arrangement.rows[s]`` of a (B, L, H, D)
    tensor whose other rows (padding) are zero: an attention backend's own token layout,
    written by the same pass instead of gathered afterwards."""
    batch, rows, inner = src.shape
    if arrangement is not None and arrangement.rows.numel() != rows:
        raise ValueError(
            f"arrangement places {arrangement.rows.numel()} tokens, the input has {rows}"
        )
    cos2, sin2 = cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1])
    if (
        _use_kernels(src, weight, cos, sin)
        and src.stride(-1) == 1
        and (batch == 1 or src.stride(0) == rows * src.stride(1))
        and weight.is_contiguous()
        and weight.numel() == inner
        and inner % (2 * num_heads) == 0
        and cos2.shape == sin2.shape == (rows, inner // num_heads // 2)
        and cos2.dtype == sin2.dtype == torch.float32
        and cos2.is_contiguous()
        and sin2.is_contiguous()
    ):
        out = None if arrangement is None else arrangement.empty(src, num_heads)
        rows_index = None if arrangement is None else arrangement.rows
        with _on_device(src):
            return _kernels().rms_norm_rotary(
                src, weight, cos2, sin2, num_heads, eps, out=out, out_rows=rows_index
            )
    normed = F.rms_norm(src, (inner,), weight.to(src.dtype), eps)
    result = apply_interleaved_rotary(normed.unflatten(2, (num_heads, -1)), cos, sin)
    if arrangement is None:
        return result
    out = arrangement.empty(src, num_heads)
    out[:, arrangement.rows] = result
    return out


class TokenRows:
    """Where each of S tokens goes in an L-row layout (``rows``, int64 on the tokens'
    device), and which rows hold no token (``padding``, zeroed so no stale memory -- a NaN
    -- reaches a kernel that multiplies by zero weights)."""

    def __init__(self, rows: torch.Tensor, padding: torch.Tensor, length: int) -> None:
        self.rows, self.padding, self.length = rows, padding, length

    def empty(self, src: torch.Tensor, num_heads: int) -> torch.Tensor:
        batch, _, inner = src.shape
        out = src.new_empty(batch, self.length, num_heads, inner // num_heads)
        return out.index_fill_(1, self.padding, 0) if self.padding.numel() else out


def gelu_(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu(x, approximate)``, written over ``x`` where the kernel applies (tanh
    approximation, contiguous): the caller hands over a temporary nobody else reads, and the
    feed-forward's widest activation is not allocated twice."""
    if approximate == "tanh" and _use_kernels(x) and x.is_contiguous():
        with _on_device(x):
            return _kernels().gelu_tanh_(x)
    return F.gelu(x, approximate=approximate)


def channel_rms_norm(
    x: torch.Tensor,
    gamma: torch.Tensor,
    scale: float,
    silu: bool = False,
    inplace: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The video VAE's norm: each position's channel vector (dim 1) L2-normalised (in float32
    for narrower dtypes), times ``scale`` and the per-channel ``gamma``, then SiLU if asked;
    x is (B, C, T, H, W) or (B, C, H, W) with any strides.

    ``inplace=True`` lets the kernel write over ``x`` (a temporary the caller no longer
    needs); ``out=`` writes the result into that tensor of x's shape (e.g. the interior of a
    convolution's padded input) and returns it. Either saves a full-resolution activation at
    the decoder's peak."""
    if _use_kernels(x, gamma) and channel_norm_fuses(x, gamma):
        target = x if inplace else out if out is not None else torch.empty_like(x)
        as_5d = (lambda t: t) if x.ndim == 5 else (lambda t: t.unsqueeze(2))
        with _on_device(x):
            _kernels().channel_rms_norm_silu(as_5d(x), gamma, scale, 1e-12, silu, as_5d(target))
        return target
    src = x.float() if x.element_size() < 4 else x
    y = F.normalize(src, dim=1).to(x.dtype) * scale * gamma
    y = F.silu(y) if silu else y
    return out.copy_(y) if out is not None else y


def channel_norm_fuses(x: torch.Tensor, gamma: torch.Tensor | None = None) -> bool:
    """Whether ``channel_rms_norm`` (and ``write_stacked_frames``) run their one-pass kernel
    for this x (the caller may build the output buffer differently when they do)."""
    return (
        _use_kernels(x, gamma)
        and x.ndim in (4, 5)
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and (gamma is None or (gamma.numel() == x.shape[1] and gamma.is_contiguous()))
    )


def write_stacked_frames(
    x: torch.Tensor,
    stacked: torch.Tensor,
    first_frame: int,
    gamma: torch.Tensor | None = None,
    scale: float = 1.0,
    silu: bool = False,
) -> None:
    """Write (B, C, T, H, W) ``x`` -- or ``silu(norm(x))`` with the norm's ``gamma`` /
    ``scale`` -- into ``stacked``, a (B, T_out, 3, C, H, W) view of a temporal-kernel-3
    convolution's input where ``stacked[:, f, s]`` is frame ``f + s`` of the padded frame
    sequence, in which x starts at ``first_frame``. One read of x, three writes; only where
    ``channel_norm_fuses(x, gamma)``."""
    if not channel_norm_fuses(x, gamma):
        raise RuntimeError("write_stacked_frames needs the fused kernels (see channel_norm_fuses)")
    out = stacked[:, :, 0].transpose(1, 2)  # (B, C, T_out, H, W), shifts at stride(2)
    with _on_device(x):
        _kernels().channel_rms_norm_silu(
            x, gamma, scale, 1e-12, silu, out, stacked.stride(2), first_frame
        )
