"""PyTorch scaled_dot_product_attention: always available; on CUDA it dispatches to the
fastest kernel PyTorch has for the shape (cuDNN, flash, memory-efficient)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvideo.attention.backends.abstract import AttentionBackend, AttentionImpl, _Backend


class SDPAImpl(AttentionImpl):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        # SDPA wants (B, H, S, D).
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.dropout_rate,
            is_causal=self.causal,
            scale=self.softmax_scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return out.transpose(1, 2)


class SDPABackend(AttentionBackend):
    @staticmethod
    def get_enum() -> _Backend:
        return _Backend.TORCH_SDPA

    @staticmethod
    def unavailable_reason() -> str | None:
        return None

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        return SDPAImpl
