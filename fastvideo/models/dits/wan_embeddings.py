"""Embeddings of the Wan2.1 DiT (see ``wanvideo.py``): 3-D rotary positions and the
timestep / text / image condition embedder, plus the feed-forward both files use."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastvideo.layers.activation import GELU, get_act_fn
from fastvideo.layers.fused_ops import gelu_
from fastvideo.layers.layernorm import FP32LayerNorm
from fastvideo.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear

# ---------------------------------------------------------------------------------------------
# Rotary position embedding
# ---------------------------------------------------------------------------------------------


class WanRotaryPosEmbed(nn.Module):
    """3-D rotary embedding: the head dimension is split into frame, height and width parts.

    Built as diffusers builds it (float64 angles, cast to float32 cos/sin), but kept at half
    width: diffusers interleaves each frequency twice and then reads every other entry back.
    Returns ``cos, sin`` of shape (1, F*H*W, 1, head_dim // 2), cached per grid and device.
    """

    _CACHE_SIZE = 8

    def __init__(self, attention_head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        h_dim = w_dim = 2 * (attention_head_dim // 6)
        self.axis_dims = (attention_head_dim - h_dim - w_dim, h_dim, w_dim)
        self.max_seq_len = max_seq_len
        self.theta = theta
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _axis_angles(self, dim: int, length: int) -> torch.Tensor:
        # Same expression and dtype as diffusers' get_1d_rotary_pos_embed (on CPU, float64).
        exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
        inv_freq = 1.0 / (self.theta**exponents)
        return torch.outer(torch.arange(length), inv_freq)  # (length, dim // 2), float64

    def forward(
        self, grid: tuple[int, int, int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(grid), torch.device(device))
        if key not in self._cache:
            if len(self._cache) >= self._CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = self._build(grid, device)
        return self._cache[key]

    def _build(
        self, grid: tuple[int, int, int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if max(grid) > self.max_seq_len:
            raise ValueError(
                f"latent grid {tuple(grid)} (frames, height, width in patches) exceeds "
                f"rope_max_seq_len={self.max_seq_len}"
            )
        cos_parts, sin_parts = [], []
        for axis, (dim, length) in enumerate(zip(self.axis_dims, grid, strict=True)):
            angles = self._axis_angles(dim, length)
            shape = [1, 1, 1, dim // 2]
            shape[axis] = length
            cos_parts.append(angles.cos().float().view(shape).expand(*grid, -1))
            sin_parts.append(angles.sin().float().view(shape).expand(*grid, -1))
        num_tokens = math.prod(grid)
        cos = torch.cat(cos_parts, dim=-1).reshape(1, num_tokens, 1, -1).to(device)
        sin = torch.cat(sin_parts, dim=-1).reshape(1, num_tokens, 1, -1).to(device)
        return cos, sin


# ---------------------------------------------------------------------------------------------
# Condition embedding: timestep, text, image
# ---------------------------------------------------------------------------------------------


def timestep_sinusoids(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0):
    """[cos | sin] sinusoids of (B,) timesteps in float32 (diffusers' ``Timesteps`` with
    flip_sin_to_cos=True, downscale_freq_shift=0)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(
        0, half, dtype=torch.float32, device=timesteps.device
    )
    freqs = torch.exp(exponent / half)
    args = timesteps[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class WanMLPEmbedder(nn.Module):
    """linear_1 -> activation -> linear_2 (diffusers' TimestepEmbedding / text projection)."""

    def __init__(self, in_features: int, hidden_size: int, act: str) -> None:
        super().__init__()
        self.linear_1 = ReplicatedLinear(in_features, hidden_size, bias=True)
        self.act = get_act_fn(act)
        self.linear_2 = ReplicatedLinear(hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.linear_1(x)
        x, _ = self.linear_2(self.act(x))
        return x


class WanFeedForward(nn.Module):
    """fc_in (column-parallel) -> activation -> fc_out (row-parallel)."""

    def __init__(self, dim: int, inner_dim: int, dim_out: int, act: str) -> None:
        super().__init__()
        self.fc_in = ColumnParallelLinear(dim, inner_dim, bias=True)
        self.act = get_act_fn(act)
        self.fc_out = RowParallelLinear(inner_dim, dim_out, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.fc_in(x)
        if isinstance(self.act, GELU):  # in place on fc_in's fresh output where it can be
            x = gelu_(x, self.act.approximate)
        else:
            x = self.act(x)
        x, _ = self.fc_out(x)
        return x


class WanImageEmbedding(nn.Module):
    """CLIP image tokens -> model width (I2V). With ``pos_embed_seq_len`` (first/last-frame
    conditioning) the two images arrive stacked on the batch axis and are joined first."""

    def __init__(self, in_features: int, out_features: int, pos_embed_seq_len: int | None):
        super().__init__()
        self.norm1 = FP32LayerNorm(in_features)
        self.ff = WanFeedForward(in_features, in_features, out_features, "gelu")
        self.norm2 = FP32LayerNorm(out_features)
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, pos_embed_seq_len, in_features))
            if pos_embed_seq_len is not None
            else None
        )

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            _, seq_len, width = image_tokens.shape
            image_tokens = image_tokens.view(-1, 2 * seq_len, width) + self.pos_embed
        return self.norm2(self.ff(self.norm1(image_tokens)))


class WanTimeTextImageEmbedding(nn.Module):
    def __init__(
        self,
        dim: int,
        freq_dim: int,
        text_dim: int,
        image_dim: int | None,
        pos_embed_seq_len: int | None,
    ) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = WanMLPEmbedder(freq_dim, dim, "silu")
        self.time_act = get_act_fn("silu")
        self.time_proj = ReplicatedLinear(dim, 6 * dim, bias=True)
        self.text_embedder = WanMLPEmbedder(text_dim, dim, "gelu_tanh")
        self.image_embedder = (
            WanImageEmbedding(image_dim, dim, pos_embed_seq_len) if image_dim is not None else None
        )

    def forward(
        self,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        t_freq = timestep_sinusoids(timestep, self.freq_dim)
        t_freq = t_freq.to(self.time_embedder.linear_1.weight.dtype)  # fp32 if kept fp32
        temb = self.time_embedder(t_freq).type_as(encoder_hidden_states)
        timestep_proj, _ = self.time_proj(self.time_act(temb))
        context = self.text_embedder(encoder_hidden_states)
        image_context = None
        if encoder_hidden_states_image is not None:
            if self.image_embedder is None:
                raise ValueError(
                    "encoder_hidden_states_image was given but the model has no image "
                    "embedder (config image_dim is None)"
                )
            image_context = self.image_embedder(encoder_hidden_states_image)
        return temb, timestep_proj, context, image_context
