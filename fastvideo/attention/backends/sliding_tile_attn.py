"""Sliding-tile attention (sparse, windowed over 3-D tiles of latent tokens).

Not built yet: the backend reports itself unavailable, so asking for it by name gives a
clear error and automatic selection passes over it.
"""

from __future__ import annotations

from fastvideo.attention.backends.abstract import AttentionBackend, AttentionImpl, _Backend


class SlidingTileAttnBackend(AttentionBackend):
    opt_in = True

    @staticmethod
    def get_enum() -> _Backend:
        return _Backend.SLIDING_TILE_ATTN

    @staticmethod
    def unavailable_reason() -> str | None:
        return "sliding-tile attention has no kernel in this build yet"

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        raise RuntimeError(SlidingTileAttnBackend.unavailable_reason())
