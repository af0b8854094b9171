"""Rotary position embedding applied to interleaved pairs of features."""

from __future__ import annotations

import torch


def apply_interleaved_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of (B, S, H, D) by angles given as float32 ``cos`` / ``sin``
    broadcastable to (B, S, H, D/2); computed in float32, returned in x's dtype."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)
