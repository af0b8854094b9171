"""Activation functions by the names model configs use for them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GELU(nn.Module):
    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "gelu": lambda: GELU(),
    "gelu-approximate": lambda: GELU("tanh"),
    "gelu_tanh": lambda: GELU("tanh"),
    "gelu_pytorch_tanh": lambda: GELU("tanh"),
    "gelu_new": lambda: GELU("tanh"),
    "quick_gelu": QuickGELU,
    "silu": nn.SiLU,
    "relu": nn.ReLU,
}


def get_act_fn(name: str) -> nn.Module:
    """The activation a config names (``"gelu"``, ``"gelu-approximate"``, ``"silu"``, ...)."""
    key = name.lower()
    if key not in _ACTIVATIONS:
        raise ValueError(
            f"activation {name!r} is not supported; choose from {sorted(_ACTIVATIONS)}"
        )
    return _ACTIVATIONS[key]()
