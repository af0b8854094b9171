"""Normalisation layers; statistics are accumulated in float32 whatever the input dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastvideo.layers.fused_ops import layer_norm_scale_shift


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension.

    Uses ``F.rms_norm``: one fused kernel that accumulates in float32 even for bf16 inputs
    (an unfused float32 version costs ~7 passes over the activations), and the same call
    ``torch.nn.RMSNorm`` makes, so results match models that use it bit for bit.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        has_weight: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.variance_epsilon = eps
        if has_weight:
            self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight is not None and weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        return F.rms_norm(x, (self.hidden_size,), weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.variance_epsilon}"


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in float32 and cast back: bf16 statistics drift over long sequences."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) == 1:  # one fused pass on CUDA
            return layer_norm_scale_shift(x, self.eps, weight=self.weight, bias=self.bias)
        orig_dtype = x.dtype
        return F.layer_norm(
            x.float(),
            self.normalized_shape,
            self.weight.float() if self.weight is not None else None,
            self.bias.float() if self.bias is not None else None,
            self.eps,
        ).to(orig_dtype)


class LayerNormScaleShift(nn.Module):
    """``norm(x) * (1 + scale) + shift`` in float32, the adaptive-norm step of DiT blocks."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__()
        self.norm = FP32LayerNorm(hidden_size, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        return layer_norm_scale_shift(x, norm.eps, shift, scale, norm.weight, norm.bias)
