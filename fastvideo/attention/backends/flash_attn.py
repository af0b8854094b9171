"""flash-attn 2/3, used when the package is installed and a CUDA device is present."""

from __future__ import annotations

import importlib.util

import torch

from fastvideo.attention.backends.abstract import AttentionBackend, AttentionImpl, _Backend
from fastvideo.attention.backends.sdpa import SDPAImpl


class FlashAttnImpl(AttentionImpl):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if query.dtype not in (torch.float16, torch.bfloat16) or not query.is_cuda:
            # flash-attn has no fp32 or CPU kernels; SDPA computes the same function.
            return SDPAImpl.forward(self, query, key, value)
        from flash_attn import flash_attn_func

        return flash_attn_func(
            query,
            key,
            value,
            dropout_p=self.dropout_rate,
            softmax_scale=self.softmax_scale,
            causal=self.causal,
        )


class FlashAttnBackend(AttentionBackend):
    @staticmethod
    def get_enum() -> _Backend:
        return _Backend.FLASH_ATTN

    @staticmethod
    def unavailable_reason() -> str | None:
        if importlib.util.find_spec("flash_attn") is None:
            return "the flash_attn package is not installed"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        return FlashAttnImpl
