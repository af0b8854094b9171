"""Attention layers that models use; the kernel underneath comes from the selector."""

from __future__ import annotations

import torch
from torch import nn

from fastvideo.attention.backends.abstract import _Backend
from fastvideo.attention.selector import get_attn_backend
from fastvideo.distributed.parallel_state import get_sp_world_size

_DEFAULT_BACKENDS = (_Backend.FLASH_ATTN, _Backend.TORCH_SDPA)


class LocalAttention(nn.Module):
    """Attention over the sequence this rank holds. Inputs are (B, S, H, D)."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        num_kv_heads: int | None = None,
        dropout_rate: float = 0.0,
        softmax_scale: float | None = None,
        causal: bool = False,
        supported_attention_backends: tuple[_Backend, ...] = _DEFAULT_BACKENDS,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_size = head_size
        self.num_kv_heads = num_kv_heads or num_heads
        self.softmax_scale = head_size**-0.5 if softmax_scale is None else softmax_scale
        self.backend = get_attn_backend(tuple(supported_attention_backends))
        self.impl = self.backend.get_impl_cls()(
            num_heads=num_heads,
            head_size=head_size,
            softmax_scale=self.softmax_scale,
            causal=causal,
            dropout_rate=dropout_rate,
            num_kv_heads=self.num_kv_heads,
        )

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return self.impl.forward(query, key, value)

    def extra_repr(self) -> str:
        backend = self.backend.get_enum().name
        return f"heads={self.num_heads}, head_size={self.head_size}, backend={backend}"


class DistributedAttention(LocalAttention):
    """Attention over a sequence split across sequence-parallel ranks.

    Each rank passes its own slice of the sequence (B, S/sp, H, D) and gets back the
    attention output for that slice. With one sequence-parallel rank this is exactly
    ``LocalAttention``.
    """

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if get_sp_world_size() > 1:
            raise RuntimeError(
                "sequence-parallel attention across ranks is not available in this build; "
                "run with sp_size=1"
            )
        return self.impl.forward(query, key, value)
