"""UMT5 text encoder (the Wan2.1 text encoder), tensor-parallel, built from transformers' config.

Numerically this is transformers' ``UMT5EncoderModel``: T5's unscaled attention (no 1/sqrt(d)),
a relative position bias learned separately by *every* layer (T5 learns one, in layer 0), padded
keys masked with the dtype's minimum, T5's RMS norm (float32 variance, no mean, no bias) and the
float16 overflow clamp. Dropout is omitted: the engine only runs inference.

Tensor parallelism splits heads and the feed-forward width: q/k/v are one fused
``QKVParallelLinear``, each rank looks up its own heads' columns of the relative bias, and ``o``
and ``wo`` are row-parallel (one all-reduce each). Parameter names follow transformers' module
tree, so a checkpoint key names the same parameter here except for the fused q/k/v and
wi_0/wi_1, which ``param_names_mapping`` routes with a shard id.

Attention calls ``F.scaled_dot_product_attention`` directly, as transformers does: the bias is
an additive float mask, which the flash backends of ``fastvideo.attention`` cannot take.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fastvideo.distributed.parallel_state import get_tp_rank, get_tp_world_size
from fastvideo.layers.activation import get_act_fn
from fastvideo.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from fastvideo.layers.vocab_parallel_embedding import VocabParallelEmbedding

_BLOCK = r"encoder\.block\.(\d+)\.layer\."
_QKV = r"encoder.block.\1.layer.0.SelfAttention.qkv.weight"
_WI = r"encoder.block.\1.layer.1.DenseReluDense.wi.weight"

# Config keys that would change the math but that this encoder-only port does not implement,
# with the value that is harmless. Any other unknown key (architectures, dtype, ...) is ignored.
_UNSUPPORTED_IF_SET: dict[str, Any] = {
    "is_decoder": False,  # a decoder stack: causal self-attention plus cross-attention
    "add_cross_attention": False,
    "pruned_heads": {},  # per-layer head counts differ from num_heads
    "quantization_config": None,  # quantised checkpoint tensors
    # False would mean T5's single bias shared by all layers; UMT5 (True) has one per layer.
    "scalable_attention": True,
}


@dataclass
class UMT5EncoderOutput:
    last_hidden_state: torch.Tensor  # (batch, seq_len, d_model)


class NewGELU(nn.Module):
    """transformers' ``gelu_new`` op by op, so half-precision inputs round where it rounds
    (``F.gelu(approximate="tanh")`` computes in float32 internally and rounds once)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3.0))))


def _activation(name: str, field: str) -> nn.Module:
    if name == "gelu_new":
        return NewGELU()
    try:
        return get_act_fn(name)
    except ValueError as err:
        raise ValueError(f"{field}: {err}") from None


class T5LayerNorm(nn.Module):
    """T5's RMS norm exactly as transformers computes it: variance in float32, the normalised
    activations cast to a half-precision weight's dtype *before* the scale (``F.rms_norm``
    scales in float32 and rounds once, which moves bf16 results by an ulp)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)  # float32 from here
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_buckets(
    length: int, num_buckets: int, max_distance: int, device: torch.device | None = None
) -> torch.Tensor:
    """(length, length) bucket index of ``key_pos - query_pos`` for bidirectional attention.

    Half the buckets are for keys after the query, half before; within each half, distances
    below a quarter of ``num_buckets`` get their own bucket and larger ones share
    logarithmically wider buckets up to ``max_distance`` (the float ops mirror transformers so
    a distance on a bucket boundary lands in the same bucket).
    """
    position = torch.arange(length, dtype=torch.long, device=device)
    relative = position[None, :] - position[:, None]
    num_buckets //= 2
    buckets = (relative > 0).to(torch.long) * num_buckets
    distance = relative.abs()
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).to(torch.long)
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    """One layer's learned bias per (bucket, head); each tensor-parallel rank holds its heads'
    columns of the checkpoint's (num_buckets, num_heads) table."""

    def __init__(self, num_buckets: int, num_heads: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_world_size()
        if num_heads % self.tp_size:
            raise ValueError(
                f"num_heads ({num_heads}) must be divisible by the tensor-parallel size "
                f"({self.tp_size})"
            )
        self.num_buckets = num_buckets
        self.num_heads = num_heads
        self.heads_per_rank = num_heads // self.tp_size
        self.weight = nn.Parameter(torch.zeros(num_buckets, self.heads_per_rank))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if tuple(loaded_weight.shape) != (self.num_buckets, self.num_heads):
            raise ValueError(
                f"relative_attention_bias: checkpoint tensor has shape "
                f"{tuple(loaded_weight.shape)}, expected ({self.num_buckets}, {self.num_heads})"
            )
        start = self.tp_rank * self.heads_per_rank
        with torch.no_grad():
            param.copy_(loaded_weight.narrow(1, start, self.heads_per_rank))

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        bias = F.embedding(buckets, self.weight)  # (q_len, k_len, heads_per_rank)
        return bias.permute(2, 0, 1).unsqueeze(0)  # (1, heads_per_rank, q_len, k_len)


class UMT5Attention(nn.Module):
    def __init__(
        self, d_model: int, d_kv: int, num_heads: int, num_buckets: int, prefix: str = ""
    ) -> None:
        super().__init__()
        self.d_kv = d_kv
        self.qkv = QKVParallelLinear(d_model, d_kv, num_heads, bias=False, prefix=f"{prefix}.qkv")
        self.num_heads = self.qkv.num_heads  # on this rank
        self.o = RowParallelLinear(num_heads * d_kv, d_model, bias=False, prefix=f"{prefix}.o")
        self.relative_attention_bias = RelativePositionBias(num_buckets, num_heads)

    def forward(
        self, x: torch.Tensor, buckets: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv, _ = self.qkv(x)
        # (B, L, 3 * H * D) -> three (B, H, L, D)
        q, k, v = qkv.view(batch, length, 3, self.num_heads, self.d_kv).permute(2, 0, 3, 1, 4)
        bias = self.relative_attention_bias(buckets).to(q.dtype)
        if key_mask is not None:
            # Padded keys get the dtype's minimum *instead of* the bias, as transformers' SDPA
            # path does; padded queries still attend to the real keys.
            bias = torch.where(key_mask, bias, torch.finfo(q.dtype).min).contiguous()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # T5: no 1/sqrt(d)
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.d_kv)
        return self.o(out)[0]


class UMT5FeedForward(nn.Module):
    """``wo(act(wi_0 x) * wi_1 x)`` (gated, UMT5's default) or ``wo(act(wi x))``."""

    def __init__(self, d_model: int, d_ff: int, act: nn.Module, gated: bool, prefix: str = ""):
        super().__init__()
        self.gated = gated
        if gated:
            self.wi = MergedColumnParallelLinear(
                d_model, [d_ff, d_ff], bias=False, prefix=f"{prefix}.wi"
            )
        else:
            self.wi = ColumnParallelLinear(d_model, d_ff, bias=False, prefix=f"{prefix}.wi")
        self.act = act
        self.wo = RowParallelLinear(d_ff, d_model, bias=False, prefix=f"{prefix}.wo")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.wi(x)
        if self.gated:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = self.act(gate) * up
        else:
            hidden = self.act(hidden)
        # ``wo`` may be kept in float32 for float16 models (see _keep_in_fp32_modules); the
        # residual stream then becomes float32 too, as in transformers.
        return self.wo(hidden.to(self.wo.weight.dtype))[0]


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """T5's guard against float16 overflow, kept so float16 outputs match transformers."""
    if x.dtype != torch.float16:
        return x
    largest = torch.finfo(torch.float16).max
    bound = torch.where(torch.isinf(x).any(), largest - 1000, largest)
    return torch.clamp(x, min=-bound, max=bound)


class UMT5LayerSelfAttention(nn.Module):
    def __init__(self, d_model, d_kv, num_heads, num_buckets, eps, prefix: str = ""):
        super().__init__()
        self.SelfAttention = UMT5Attention(
            d_model, d_kv, num_heads, num_buckets, prefix=f"{prefix}.SelfAttention"
        )
        self.layer_norm = T5LayerNorm(d_model, eps)

    def forward(self, x, buckets, key_mask):
        return x + self.SelfAttention(self.layer_norm(x), buckets, key_mask)


class UMT5LayerFF(nn.Module):
    def __init__(self, d_model, d_ff, act, gated, eps, prefix: str = ""):
        super().__init__()
        self.DenseReluDense = UMT5FeedForward(
            d_model, d_ff, act, gated, prefix=f"{prefix}.DenseReluDense"
        )
        self.layer_norm = T5LayerNorm(d_model, eps)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class UMT5Block(nn.Module):
    """Pre-norm self-attention then pre-norm feed-forward, each added to the residual."""

    def __init__(self, layer: nn.Module, feed_forward: nn.Module) -> None:
        super().__init__()
        self.layer = nn.ModuleList([layer, feed_forward])  # transformers' names: layer.0/1

    def forward(self, x, buckets, key_mask):
        x = _clamp_fp16(self.layer[0](x, buckets, key_mask))
        return _clamp_fp16(self.layer[1](x))


class UMT5Stack(nn.Module):
    def __init__(self, blocks: list[UMT5Block], d_model: int, eps: float) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.final_layer_norm = T5LayerNorm(d_model, eps)


class UMT5EncoderModel(nn.Module):
    """transformers' ``UMT5EncoderModel``; the constructor takes its ``config.json``."""

    param_names_mapping: ClassVar[dict[str, str | tuple[str, object]]] = {
        _BLOCK + r"0\.SelfAttention\.q\.weight": (_QKV, "q"),
        _BLOCK + r"0\.SelfAttention\.k\.weight": (_QKV, "k"),
        _BLOCK + r"0\.SelfAttention\.v\.weight": (_QKV, "v"),
        _BLOCK + r"1\.DenseReluDense\.wi_0\.weight": (_WI, 0),
        _BLOCK + r"1\.DenseReluDense\.wi_1\.weight": (_WI, 1),
    }
    # transformers ties the encoder's embedding to ``shared``; a saved copy is the same table.
    ignored_checkpoint_keys: tuple[str, ...] = (r"encoder\.embed_tokens\.weight",)

    def __init__(
        self,
        vocab_size: int = 250112,
        d_model: int = 512,
        d_kv: int = 64,
        d_ff: int = 1024,
        num_layers: int = 8,
        num_heads: int = 6,
        relative_attention_num_buckets: int = 32,
        relative_attention_max_distance: int = 128,
        dropout_rate: float = 0.1,  # training only
        layer_norm_epsilon: float = 1e-6,
        feed_forward_proj: str = "gated-gelu",
        dense_act_fn: str | None = None,
        is_gated_act: bool | None = None,
        model_type: str = "umt5",
        **config: Any,  # the rest of transformers' config.json (architectures, dtype, ...)
    ) -> None:
        super().__init__()
        _check_supported(model_type, config)
        act_name, gated = _feed_forward_kind(feed_forward_proj, dense_act_fn, is_gated_act)
        act = _activation(act_name, "dense_act_fn" if dense_act_fn else "feed_forward_proj")
        self.relative_attention_num_buckets = relative_attention_num_buckets
        self.relative_attention_max_distance = relative_attention_max_distance
        self.shared = VocabParallelEmbedding(vocab_size, d_model, prefix="shared")
        blocks = []
        for i in range(num_layers):
            prefix = f"encoder.block.{i}.layer"
            attention = UMT5LayerSelfAttention(
                d_model,
                d_kv,
                num_heads,
                relative_attention_num_buckets,
                layer_norm_epsilon,
                prefix=f"{prefix}.0",
            )
            feed_forward = UMT5LayerFF(
                d_model, d_ff, act, gated, layer_norm_epsilon, prefix=f"{prefix}.1"
            )
            blocks.append(UMT5Block(attention, feed_forward))
        self.encoder = UMT5Stack(blocks, d_model, layer_norm_epsilon)

    @property
    def _keep_in_fp32_modules(self) -> tuple[str, ...]:
        # transformers keeps ``wo`` in float32 for float16 models only (T5's last projection
        # overflows float16); bfloat16 has float32's range and stays bfloat16 throughout.
        return ("wo",) if self.shared.weight.dtype == torch.float16 else ()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> UMT5EncoderOutput:
        """``input_ids``: (batch, seq_len) token ids; ``attention_mask``: (batch, seq_len),
        1 for real tokens, 0 for padding. Padded positions get outputs too (they attend to
        the real tokens), exactly as in transformers."""
        hidden = self.shared(input_ids)  # (B, L, d_model)
        buckets = relative_position_buckets(
            input_ids.shape[1],
            self.relative_attention_num_buckets,
            self.relative_attention_max_distance,
            device=input_ids.device,
        )
        key_mask = None
        if attention_mask is not None:
            key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): over keys
        for block in self.encoder.block:
            hidden = block(hidden, buckets, key_mask)
        return UMT5EncoderOutput(last_hidden_state=self.encoder.final_layer_norm(hidden))


def _check_supported(model_type: str, config: dict[str, Any]) -> None:
    if model_type != "umt5":
        raise ValueError(
            f"model_type={model_type!r}: this is the UMT5 encoder (a relative position bias "
            "in every layer); T5 and other variants are not supported by this port"
        )
    for key, harmless in _UNSUPPORTED_IF_SET.items():
        if key in config and config[key] not in (harmless, None):
            raise ValueError(
                f"{key}={config[key]!r} is not supported by this UMT5 encoder port "
                f"(supported: {harmless!r})"
            )


def _feed_forward_kind(
    feed_forward_proj: str, dense_act_fn: str | None, is_gated_act: bool | None
) -> tuple[str, bool]:
    """(activation name, gated?) with transformers' precedence: explicit ``dense_act_fn`` /
    ``is_gated_act`` keys win over what ``feed_forward_proj`` implies."""
    parts = feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(
            f"feed_forward_proj={feed_forward_proj!r} is not of the form 'gated-<act>' or '<act>'"
        )
    implied_act = "gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]
    act = dense_act_fn if dense_act_fn is not None else implied_act
    gated = is_gated_act if is_gated_act is not None else parts[0] == "gated"
    return act, bool(gated)
