"""Normalisation layers. Statistics are computed in float32 whatever the input dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, computed in float32."""

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
        orig_dtype = x.dtype
        x32 = x.float()
        variance = x32.pow(2).mean(dim=-1, keepdim=True)
        x32 = x32 * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight is not None:
            x32 = x32 * self.weight.float()
        return x32.to(orig_dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.variance_epsilon}"


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in float32 and cast back: bf16 statistics drift over long sequences."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        return (self.norm(x.float()) * (1 + scale) + shift).to(x.dtype)
