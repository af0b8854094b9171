"""The attention backend contract.

A backend is a kernel family (SDPA, flash-attn, sliding-tile...). Layers ask the selector for
one at construction time and call its implementation with tensors laid out as
``(batch, seq_len, num_heads, head_size)``. Sparse patterns laid over the video (sliding-tile)
also need to know where each token sits: their implementations set ``needs_video_grid`` and
the layer passes them a ``VideoGrid``.
"""

from __future__ import annotations

import enum
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch


class _Backend(enum.Enum):
    FLASH_ATTN = enum.auto()
    TORCH_SDPA = enum.auto()
    SLIDING_TILE_ATTN = enum.auto()


@dataclass(frozen=True)
class VideoGrid:
    """Where the tokens of a self-attention sequence sit: ``frames x height x width`` latent
    tokens (after patching) in (t, h, w) row-major order, then ``extra_tokens`` others (e.g.
    text) appended at the end."""

    frames: int
    height: int
    width: int
    extra_tokens: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.shape) + self.extra_tokens


class AttentionImpl(ABC):
    #: ``forward`` takes ``video_grid=`` (a ``VideoGrid``): the pattern depends on where each
    #: token sits in the video, and the keys must be the whole sequence (no ring attention).
    needs_video_grid: ClassVar[bool] = False

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
