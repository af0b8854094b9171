"""Small torch helpers shared by stages and loaders."""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype most of a module's weights are in (a few may be kept in float32 on purpose)."""
    if hasattr(module, "dtype") and isinstance(module.dtype, torch.dtype):
        return module.dtype
    counts: Counter[torch.dtype] = Counter()
    for param in module.parameters():
        counts[param.dtype] += param.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def module_device(module: nn.Module) -> torch.device:
    if hasattr(module, "device") and isinstance(module.device, torch.device):
        return module.device
    for param in module.parameters():
        return param.device
    return torch.device("cpu")
