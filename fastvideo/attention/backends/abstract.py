"""The attention backend contract.

A backend is a kernel family (SDPA, flash-attn, sliding-tile...). Layers ask the selector for
one at construction time and call its implementation with tensors laid out as
``(batch, seq_len, num_heads, head_size)``.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod

import torch


class _Backend(enum.Enum):
    FLASH_ATTN = enum.auto()
    TORCH_SDPA = enum.auto()
    SLIDING_TILE_ATTN = enum.auto()


class AttentionImpl(ABC):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        softmax_scale: float,
        causal: bool = False,
        dropout_rate: float = 0.0,
        num_kv_heads: int | None = None,
    ) -> None:
        self.num_heads = num_heads
        self.head_size = head_size
        self.softmax_scale = softmax_scale
        self.causal = causal
        self.dropout_rate = dropout_rate
        self.num_kv_heads = num_kv_heads or num_heads

    @abstractmethod
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """(B, Sq, H, D), (B, Skv, H, D), (B, Skv, H, D) -> (B, Sq, H, D)."""


class AttentionBackend(ABC):
    #: Backends that change the result (sparse patterns) are used only when asked for by name.
    opt_in: bool = False

    @staticmethod
    @abstractmethod
    def get_enum() -> _Backend: ...

    @staticmethod
    @abstractmethod
    def unavailable_reason() -> str | None:
        """Why this backend cannot run in this process, or ``None`` when it can."""

    @staticmethod
    @abstractmethod
    def get_impl_cls() -> type[AttentionImpl]: ...
