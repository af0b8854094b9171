"""Attention layers that models use; the kernel underneath comes from the selector."""

from __future__ import annotations

import torch
from torch import nn

from fastvideo.attention.backends.abstract import VideoGrid, _Backend
from fastvideo.attention.ring import ring_attention
from fastvideo.attention.selector import get_attn_backend
from fastvideo.attention.sequence_parallel import sp_factorisation
from fastvideo.attention.ulysses import heads_to_seq, seq_to_heads
from fastvideo.distributed.parallel_state import get_sp_ulysses_ring_groups, get_sp_world_size

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

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        video_grid: VideoGrid | None = None,
        arranged: bool = False,
    ) -> torch.Tensor:
        return self._attend(query, key, value, video_grid, arranged)

    def token_arrangement(self, video_grid: VideoGrid | None, device: torch.device):
        """Where this layer's backend wants q, k and v rows (an object with ``query_rows``,
        ``key_rows`` and ``key_token_of_slot``), for callers that can write them there
        themselves and then pass ``arranged=True``; None when the backend keeps token
        order."""
        arrange = getattr(self.impl, "token_arrangement", None)
        if arrange is None or video_grid is None:
            return None
        return arrange(video_grid, device)

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        video_grid: VideoGrid | None,
        arranged: bool = False,
    ) -> torch.Tensor:
        """The backend kernel; ``video_grid`` reaches only the backends that lay their
        pattern over the video (the rest ignore it)."""
        if not self.impl.needs_video_grid:
            return self.impl.forward(query, key, value)
        if video_grid is None:
            raise ValueError(
                f"{self.backend.get_enum().name} needs to know where the tokens sit in the "
                "video, but this layer was called without video_grid="
            )
        if arranged:
            return self.impl.forward(query, key, value, video_grid=video_grid, arranged=True)
        return self.impl.forward(query, key, value, video_grid=video_grid)

    def extra_repr(self) -> str:
        backend = self.backend.get_enum().name
        return f"heads={self.num_heads}, head_size={self.head_size}, backend={backend}"


class DistributedAttention(LocalAttention):
    """Self-attention over a sequence split across sequence-parallel (SP) ranks.

    Each rank passes its own slice (B, S/sp, H, D) of query, key and value, laid out as
    ``attention.sequence_parallel.shard_sequence`` cuts them, and gets back the attention
    output for that slice. ``seq_len`` is the number of real tokens in the whole sequence
    (default: all of them); the padding after them is never attended to.

    The SP degree is factored as ``ulysses x ring`` (``sp_factorisation``): a Ulysses
    all-to-all gives each rank a contiguous block of ``ulysses`` slices with H/ulysses heads,
    the backend kernel attends within it when ``ring`` is 1, and ring attention over the
    blocks covers the rest. With one SP rank this is exactly ``LocalAttention``.

    ``video_grid`` describes the whole sequence (all ranks'), for backends whose pattern
    depends on token positions (sliding-tile). They need the Ulysses-only layout: after the
    all-to-all each rank holds every token for its heads; the ring path is refused.
    """

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        seq_len: int | None = None,
        video_grid: VideoGrid | None = None,
        arranged: bool = False,
    ) -> torch.Tensor:
        sp = get_sp_world_size()
        if sp == 1:
            if arranged:
                return self._attend(query, key, value, video_grid, arranged=True)
            if seq_len is not None and seq_len < key.shape[1]:
                key, value = key[:, :seq_len], value[:, :seq_len]
            return self._attend(query, key, value, video_grid)
        if arranged:
            raise ValueError("arranged=True is for one rank: token_arrangement() was None")
        return self._forward_sequence_parallel(query, key, value, seq_len, sp, video_grid)

    def token_arrangement(self, video_grid: VideoGrid | None, device: torch.device):
        """As LocalAttention's, on one rank only: with sequence parallelism q, k and v
        cross an all-to-all in token order first."""
        if get_sp_world_size() > 1:
            return None
        return super().token_arrangement(video_grid, device)

    def _forward_sequence_parallel(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        seq_len: int | None,
        sp: int,
        video_grid: VideoGrid | None,
    ) -> torch.Tensor:
        if self.impl.causal or self.num_kv_heads != self.num_heads:
            raise NotImplementedError(
                "sequence-parallel attention supports non-causal attention with as many "
                "key/value heads as query heads"
            )
        if not query.shape == key.shape == value.shape:
            raise ValueError(
                "sequence-parallel self-attention needs query, key and value of one shape, got "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        padded_len = sp * query.shape[1]
        seq_len = padded_len if seq_len is None else seq_len
        if not 0 < seq_len <= padded_len:
            raise ValueError(f"seq_len={seq_len} must be in [1, {padded_len}]")
        ulysses, ring = sp_factorisation(sp, self.num_heads)
        if ring > 1 and self.impl.needs_video_grid:
            raise ValueError(
                f"{self.backend.get_enum().name} needs each rank to hold the whole sequence, "
                f"which only the Ulysses all-to-all gives: sp={sp} over {self.num_heads} heads "
                f"factors as ulysses={ulysses} x ring={ring}, and the ring path splits the keys "
                f"across ranks. Use an SP degree that divides the head count {self.num_heads}."
            )
        ulysses_group, ring_group = get_sp_ulysses_ring_groups(ulysses)

        if ulysses > 1:
            # (3, B, ulysses*S/sp, H/ulysses, D): this ring rank's block, our heads.
            qkv = seq_to_heads((query, key, value), ulysses_group)
            query, kv = qkv[0], qkv[1:]
        else:
            kv = torch.stack((key, value))

        if ring == 1:
            key, value = kv[0, :, :seq_len], kv[1, :, :seq_len]
            out = self._attend(query, key, value, video_grid)
        else:
            if self.impl.dropout_rate:
                raise NotImplementedError("ring attention does not support dropout")
            out = ring_attention(query, kv, seq_len, self.softmax_scale, ring_group)

        return heads_to_seq(out, ulysses_group) if ulysses > 1 else out
