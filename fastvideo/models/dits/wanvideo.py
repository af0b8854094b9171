"""Wan2.1 video diffusion transformer, a native port of diffusers' ``WanTransformer3DModel``.

Data flow: the latent video (B, C, T, H, W) is cut into 3-D patches (a strided Conv3d), each
block runs self-attention with 3-D rotary positions, cross-attention to the text (and, for
image-to-video, to the image tokens) and a feed-forward, all modulated by the timestep; the
output head turns the tokens back into patches. The embeddings (rotary, timestep / text /
image) and the feed-forward live in ``wan_embeddings.py``.

Numerics follow diffusers step by step: norms and modulation run in float32 and are cast back
with ``type_as`` where diffusers casts, so a float32 model matches to rounding and a bf16 model
rounds where diffusers rounds. Checkpoints are diffusers' (unfused q/k/v); ``param_names_mapping``
routes them into the fused projections here.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from torch import nn

from fastvideo.attention import DistributedAttention, LocalAttention
from fastvideo.attention.backends.abstract import VideoGrid, _Backend
from fastvideo.attention.sequence_parallel import gather_sequence, shard_sequence
from fastvideo.distributed.communication_op import tensor_model_parallel_all_reduce
from fastvideo.distributed.parallel_state import (
    get_sp_world_size,
    get_tp_rank,
    get_tp_world_size,
)
from fastvideo.layers.fused_ops import gated_residual, rms_norm_rotary
from fastvideo.layers.layernorm import FP32LayerNorm, LayerNormScaleShift, RMSNorm
from fastvideo.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from fastvideo.layers.rotary import apply_interleaved_rotary
from fastvideo.models.dits.step_cache import StepCacheBranch
from fastvideo.models.dits.wan_embeddings import (
    WanFeedForward,
    WanRotaryPosEmbed,
    WanTimeTextImageEmbedding,
)

# The Wan2.1 text encoder (umT5) context is always padded to 512 tokens. diffusers' I2V
# cross-attention relies on that: the image tokens are whatever precedes the last 512 tokens.
TEXT_CONTEXT_LENGTH = 512

_CROSS_ATTENTION_BACKENDS = (_Backend.FLASH_ATTN, _Backend.TORCH_SDPA)
_SUPPORTED_QK_NORMS = ("rms_norm_across_heads", None)
_BLOCK = r"blocks\.(\d+)\."  # checkpoint-key prefix of one transformer block

# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


class WanQKNorm(RMSNorm):
    """RMSNorm over all heads' features at once ("rms_norm_across_heads").

    Under tensor parallelism each rank holds a slice of the heads, so the weight is sliced
    alike and the sum of squares is reduced over ranks before taking the mean.
    """

    def __init__(self, total_size: int, eps: float) -> None:
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_world_size()
        super().__init__(total_size // self.tp_size, eps=eps)
        self.total_size = total_size
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if tuple(loaded_weight.shape) != (self.total_size,):
            raise ValueError(
                f"checkpoint shape {tuple(loaded_weight.shape)}, expected ({self.total_size},)"
            )
        shard = param.shape[0]
        with torch.no_grad():
            param.copy_(loaded_weight.narrow(0, self.tp_rank * shard, shard))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward(x)
        x32 = x.float()
        sum_sq = tensor_model_parallel_all_reduce(x32.pow(2).sum(dim=-1, keepdim=True))
        x32 = x32 * torch.rsqrt(sum_sq / self.total_size + self.variance_epsilon)
        return (x32 * self.weight.float()).to(x.dtype)


class WanSelfAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        eps: float,
        supported_attention_backends: tuple[_Backend, ...],
    ) -> None:
        super().__init__()
        inner_dim = num_heads * head_dim
        self.to_qkv = QKVParallelLinear(dim, head_dim, num_heads, bias=True)
        self.local_heads = self.to_qkv.num_heads
        self.norm_q = WanQKNorm(inner_dim, eps)
        self.norm_k = WanQKNorm(inner_dim, eps)
        self.attn = DistributedAttention(
            self.local_heads,
            head_dim,
            supported_attention_backends=supported_attention_backends,
        )
        self.to_out = RowParallelLinear(inner_dim, dim, bias=True)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        seq_len: int | None = None,
        video_grid: VideoGrid | None = None,
    ) -> torch.Tensor:
        qkv, _ = self.to_qkv(x)
        q, k, v = qkv.chunk(3, dim=-1)
        v = v.unflatten(2, (self.local_heads, -1))
        arranged = None
        if self.norm_q.tp_size == 1:
            # One pass per q / k: norm, rotation, and heads laid out for attention -- in the
            # backend's own token order where it has one (sliding-tile attention on one
            # rank), saving it the gathers. v is copied out too, so the fused projection's
            # buffer (3x the activations) is freed before attention instead of living
            # through it as v's storage.
            arranged = self.attn.token_arrangement(video_grid, x.device)
            q_rows = None if arranged is None else arranged.query_rows
            k_rows = None if arranged is None else arranged.key_rows
            eps = self.norm_q.variance_epsilon
            q = rms_norm_rotary(q, self.norm_q.weight, eps, *rotary, self.local_heads, q_rows)
            k = rms_norm_rotary(k, self.norm_k.weight, eps, *rotary, self.local_heads, k_rows)
            v = (
                v.contiguous()
                if arranged is None
                else v.index_select(1, arranged.key_token_of_slot)
            )
            del qkv
        else:  # the norm's statistics need an all-reduce over the TP ranks first
            q = apply_interleaved_rotary(
                self.norm_q(q).unflatten(2, (self.local_heads, -1)), *rotary
            )
            k = apply_interleaved_rotary(
                self.norm_k(k).unflatten(2, (self.local_heads, -1)), *rotary
            )
        out = self.attn(
            q, k, v, seq_len=seq_len, video_grid=video_grid, arranged=arranged is not None
        )
        out = out.flatten(2, 3).type_as(q)
        out, _ = self.to_out(out)
        return out


class WanCrossAttention(nn.Module):
    """Attention to the text tokens, plus (I2V) a separate attention to the image tokens
    with their own key/value projections; the two results are summed."""

    def __init__(
        self, dim: int, num_heads: int, head_dim: int, eps: float, added_kv_proj_dim: int | None
    ) -> None:
        super().__init__()
        inner_dim = num_heads * head_dim
        self.to_q = ColumnParallelLinear(dim, inner_dim, bias=True)
        self.to_kv = MergedColumnParallelLinear(dim, [inner_dim, inner_dim], bias=True)
        self.local_heads = num_heads // self.to_q.tp_size
        self.norm_q = WanQKNorm(inner_dim, eps)
        self.norm_k = WanQKNorm(inner_dim, eps)
        self.add_kv_proj = None
        if added_kv_proj_dim is not None:
            self.add_kv_proj = MergedColumnParallelLinear(
                added_kv_proj_dim, [inner_dim, inner_dim], bias=True
            )
            self.norm_added_k = WanQKNorm(inner_dim, eps)
        self.attn = LocalAttention(
            self.local_heads, head_dim, supported_attention_backends=_CROSS_ATTENTION_BACKENDS
        )
        self.to_out = RowParallelLinear(inner_dim, dim, bias=True)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(2, (self.local_heads, -1))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        image_context = None
        if self.add_kv_proj is not None:
            # diffusers' convention: context = [image tokens, 512 text tokens]; split by count.
            num_image_tokens = context.shape[1] - TEXT_CONTEXT_LENGTH
            if num_image_tokens <= 0:
                raise ValueError(
                    f"I2V cross-attention expects image tokens followed by "
                    f"{TEXT_CONTEXT_LENGTH} text tokens, got {context.shape[1]} tokens in all"
                )
            image_context = context[:, :num_image_tokens]
            context = context[:, num_image_tokens:]

        q, _ = self.to_q(x)
        q = self._heads(self.norm_q(q))
        kv, _ = self.to_kv(context)
        k, v = kv.chunk(2, dim=-1)
        k, v = self._heads(self.norm_k(k)), self._heads(v)

        image_out = None
        if image_context is not None:
            kv_img, _ = self.add_kv_proj(image_context)
            k_img, v_img = kv_img.chunk(2, dim=-1)
            k_img, v_img = self._heads(self.norm_added_k(k_img)), self._heads(v_img)
            image_out = self.attn(q, k_img, v_img).flatten(2, 3).type_as(q)

        out = self.attn(q, k, v).flatten(2, 3).type_as(q)
        if image_out is not None:
            out = out + image_out
        out, _ = self.to_out(out)
        return out


# ---------------------------------------------------------------------------------------------
# Transformer block
# ---------------------------------------------------------------------------------------------


class WanTransformerBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        head_dim: int,
        cross_attn_norm: bool,
        eps: float,
        added_kv_proj_dim: int | None,
        supported_attention_backends: tuple[_Backend, ...],
    ) -> None:
        super().__init__()
        self.norm1 = LayerNormScaleShift(dim, eps=eps, elementwise_affine=False)
        self.attn1 = WanSelfAttention(dim, num_heads, head_dim, eps, supported_attention_backends)
        self.norm2 = (
            FP32LayerNorm(dim, eps=eps, elementwise_affine=True) if cross_attn_norm else None
        )
        self.attn2 = WanCrossAttention(dim, num_heads, head_dim, eps, added_kv_proj_dim)
        self.norm3 = LayerNormScaleShift(dim, eps=eps, elementwise_affine=False)
        self.ffn = WanFeedForward(dim, ffn_dim, dim, "gelu-approximate")
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        timestep_proj: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        seq_len: int | None = None,
        video_grid: VideoGrid | None = None,
    ) -> torch.Tensor:
        # (1, 6, dim) + (B, 6, dim) in float32 -> six (B, 1, dim) modulation vectors.
        shift, scale, gate, c_shift, c_scale, c_gate = (
            self.scale_shift_table + timestep_proj.float()
        ).chunk(6, dim=1)

        # Each intermediate is dropped as soon as it is used: the feed-forward's wide hidden
        # activation is the peak of the forward, and nothing else should still be alive then.
        attn_out = self.attn1(self.norm1(x, shift, scale), rotary, seq_len, video_grid)
        x = gated_residual(x, attn_out, gate)
        del attn_out

        normed = self.norm2(x) if self.norm2 is not None else x  # float32 norm, cast back
        x = x + self.attn2(normed, context)
        del normed

        ff_out = self.ffn(self.norm3(x, c_shift, c_scale))
        return gated_residual(x, ff_out, c_gate)

    def modulated_input(self, x: torch.Tensor, timestep_proj: torch.Tensor) -> torch.Tensor:
        """What self-attention sees, ``norm1(x) * (1 + scale) + shift``: the step cache's
        indicator of how much this step's input changed."""
        shift, scale = (self.scale_shift_table[:, :2] + timestep_proj[:, :2].float()).chunk(2, 1)
        return self.norm1(x, shift, scale)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def _check_config(cfg: SimpleNamespace) -> None:
    def fail(field: str, why: str) -> None:
        raise ValueError(f"WanTransformer3DModel config {field}={getattr(cfg, field)!r}: {why}")

    def positive_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    patch = cfg.patch_size
    if not isinstance(patch, tuple) or len(patch) != 3 or not all(map(positive_int, patch)):
        fail("patch_size", "must be three positive ints (t, h, w)")
    for field in ("num_attention_heads", "in_channels", "text_dim", "freq_dim", "ffn_dim"):
        if not positive_int(getattr(cfg, field)):
            fail(field, "must be a positive int")
    if not positive_int(cfg.attention_head_dim) or cfg.attention_head_dim % 2:
        fail("attention_head_dim", "must be a positive even int (rotary pairs)")
    if not (isinstance(cfg.num_layers, int) and cfg.num_layers >= 0):
        fail("num_layers", "must be a non-negative int")
    if not positive_int(cfg.out_channels):
        fail("out_channels", "must be a positive int or None (= in_channels)")
    if cfg.qk_norm not in _SUPPORTED_QK_NORMS:
        fail("qk_norm", f"supported values are {_SUPPORTED_QK_NORMS}")
    if not isinstance(cfg.cross_attn_norm, bool):
        fail("cross_attn_norm", "must be a bool")
    if not (isinstance(cfg.eps, (int, float)) and cfg.eps > 0):
        fail("eps", "must be a positive number")
    if not positive_int(cfg.rope_max_seq_len):
        fail("rope_max_seq_len", "must be a positive int")
    for field in ("image_dim", "pos_embed_seq_len"):
        if getattr(cfg, field) is not None and not positive_int(getattr(cfg, field)):
            fail(field, "must be a positive int or None")
    inner_dim = cfg.num_attention_heads * cfg.attention_head_dim
    if cfg.added_kv_proj_dim is not None and cfg.added_kv_proj_dim != inner_dim:
        # The image tokens reach attn2 already projected to the model width.
        fail("added_kv_proj_dim", f"must be None or num_attention_heads * head_dim = {inner_dim}")


class WanTransformer3DModel(nn.Module):
    """Wan2.1 DiT (T2V and I2V). Build with diffusers' config keys; load diffusers weights
    through ``param_names_mapping``."""

    _supported_attention_backends = (
        _Backend.SLIDING_TILE_ATTN,
        _Backend.FLASH_ATTN,
        _Backend.TORCH_SDPA,
    )
    # Same list as diffusers: these parameters stay float32 in a bf16 model.
    _keep_in_fp32_modules = (
        "rope",
        "time_embedder",
        "scale_shift_table",
        "norm1",
        "norm2",
        "norm3",
    )

    param_names_mapping: ClassVar[dict[str, str | tuple[str, object]]] = {
        _BLOCK + r"attn1\.to_q\.(weight|bias)": (r"blocks.\1.attn1.to_qkv.\2", "q"),
        _BLOCK + r"attn1\.to_k\.(weight|bias)": (r"blocks.\1.attn1.to_qkv.\2", "k"),
        _BLOCK + r"attn1\.to_v\.(weight|bias)": (r"blocks.\1.attn1.to_qkv.\2", "v"),
        _BLOCK + r"attn2\.to_k\.(weight|bias)": (r"blocks.\1.attn2.to_kv.\2", 0),
        _BLOCK + r"attn2\.to_v\.(weight|bias)": (r"blocks.\1.attn2.to_kv.\2", 1),
        _BLOCK + r"attn2\.add_k_proj\.(weight|bias)": (r"blocks.\1.attn2.add_kv_proj.\2", 0),
        _BLOCK + r"attn2\.add_v_proj\.(weight|bias)": (r"blocks.\1.attn2.add_kv_proj.\2", 1),
        # diffusers' fused layout (after fuse_projections), loaded whole.
        _BLOCK + r"attn2\.to_added_kv\.(weight|bias)": r"blocks.\1.attn2.add_kv_proj.\2",
        _BLOCK + r"(attn1|attn2)\.to_out\.0\.(weight|bias)": r"blocks.\1.\2.to_out.\3",
        _BLOCK + r"ffn\.net\.0\.proj\.(weight|bias)": r"blocks.\1.ffn.fc_in.\2",
        _BLOCK + r"ffn\.net\.2\.(weight|bias)": r"blocks.\1.ffn.fc_out.\2",
        r"condition_embedder\.image_embedder\.ff\.net\.0\.proj\.(weight|bias)": (
            r"condition_embedder.image_embedder.ff.fc_in.\1"
        ),
        r"condition_embedder\.image_embedder\.ff\.net\.2\.(weight|bias)": (
            r"condition_embedder.image_embedder.ff.fc_out.\1"
        ),
    }
    # Some converted I2V checkpoints carry a query norm for the image branch that diffusers
    # never uses (its _keys_to_ignore_on_load_unexpected).
    ignored_checkpoint_keys: tuple[str, ...] = (r"blocks\.\d+\.attn2\.norm_added_q\.(weight|bias)",)

    def __init__(
        self,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int | None = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
    ) -> None:
        super().__init__()
        # qk_norm: diffusers applies the across-heads RMSNorm to q and k whatever this says
        # (None included), and its checkpoints carry norm_q/norm_k; we do the same.
        self.config = SimpleNamespace(
            patch_size=tuple(patch_size) if isinstance(patch_size, (list, tuple)) else patch_size,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels or in_channels,
            text_dim=text_dim,
            freq_dim=freq_dim,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            cross_attn_norm=cross_attn_norm,
            qk_norm=qk_norm,
            eps=eps,
            image_dim=image_dim,
            added_kv_proj_dim=added_kv_proj_dim,
            rope_max_seq_len=rope_max_seq_len,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        _check_config(self.config)
        cfg = self.config
        inner_dim = num_attention_heads * attention_head_dim
        self.inner_dim = inner_dim

        self.rope = WanRotaryPosEmbed(attention_head_dim, rope_max_seq_len)
        self.patch_embedding = nn.Conv3d(
            in_channels, inner_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.condition_embedder = WanTimeTextImageEmbedding(
            inner_dim, freq_dim, text_dim, image_dim, pos_embed_seq_len
        )
        self.blocks = nn.ModuleList(
            WanTransformerBlock(
                inner_dim,
                ffn_dim,
                num_attention_heads,
                attention_head_dim,
                cross_attn_norm,
                eps,
                added_kv_proj_dim,
                self._supported_attention_backends,
            )
            for _ in range(num_layers)
        )
        self.norm_out = LayerNormScaleShift(inner_dim, eps=eps, elementwise_affine=False)
        self.proj_out = ReplicatedLinear(
            inner_dim, cfg.out_channels * math.prod(cfg.patch_size), bias=True
        )
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, inner_dim) / inner_dim**0.5)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> WanTransformer3DModel:
        """Build from a diffusers config dict; its ``_``-prefixed bookkeeping keys are dropped."""
        values = {k: v for k, v in config.items() if not k.startswith("_")}
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"WanTransformer3DModel config has unsupported keys: {unknown}")
        return cls(**values)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        step_cache: StepCacheBranch | None = None,
    ) -> torch.Tensor:
        """(B, C_in, T, H, W) latents, (B,) timesteps, (B, L, text_dim) text states [, (B, N,
        image_dim) CLIP image states] -> (B, C_out, T, H, W) prediction.

        ``step_cache``: this guidance branch's step-cache state (``step_cache.py``); it may
        replace the blocks by the residual cached at an earlier step."""
        if hidden_states.ndim != 5 or hidden_states.shape[1] != self.config.in_channels:
            raise ValueError(
                f"hidden_states must be (B, {self.config.in_channels}, T, H, W), "
                f"got {tuple(hidden_states.shape)}"
            )
        if timestep.ndim != 1:
            raise ValueError(
                f"timestep must have shape (B,), got {tuple(timestep.shape)}; per-token "
                "timesteps (Wan2.2 TI2V) are not supported"
            )
        batch = hidden_states.shape[0]
        p_t, p_h, p_w = self.config.patch_size
        grid = (
            hidden_states.shape[2] // p_t,
            hidden_states.shape[3] // p_h,
            hidden_states.shape[4] // p_w,
        )
        if min(grid) < 1:
            raise ValueError(
                f"latent of shape {tuple(hidden_states.shape)} is smaller than one patch "
                f"{self.config.patch_size}"
            )
        rotary = self.rope(grid, hidden_states.device)

        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
        seq_len = None
        if get_sp_world_size() > 1:
            # Each SP rank carries its contiguous slice of the tokens (padded to a multiple of
            # sp) through the blocks; every op but self-attention is per token, and the
            # rotary tables are sliced alike so positions stay global.
            seq_len = x.shape[1]
            x = shard_sequence(x)
            rotary = (shard_sequence(rotary[0]), shard_sequence(rotary[1]))

        temb, timestep_proj, context, image_context = self.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image
        )
        timestep_proj = timestep_proj.unflatten(1, (6, -1))  # (B, 6, dim)
        if image_context is not None:
            context = torch.cat([image_context, context], dim=1)

        # Self-attention's tokens are the whole (t, h, w) grid, row-major, and nothing else.
        video_grid = VideoGrid(*grid)

        def run_blocks(x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x, context, timestep_proj, rotary, seq_len, video_grid)
            return x

        if step_cache is None or not self.blocks:
            for block in self.blocks:  # inline: the embedded input is freed after block 0
                x = block(x, context, timestep_proj, rotary, seq_len, video_grid)
        else:
            indicator = self.blocks[0].modulated_input(x, timestep_proj)
            x = step_cache.run(x, indicator, run_blocks, seq_len)

        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = self.norm_out(x, shift, scale)
        x, _ = self.proj_out(x)
        if seq_len is not None:
            x = gather_sequence(x, seq_len)  # after proj_out: out_channels*patch, not dim, travel

        # (B, F*H*W, p_t*p_h*p_w*C) -> (B, C, F*p_t, H*p_h, W*p_w)
        x = x.reshape(batch, *grid, p_t, p_h, p_w, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
