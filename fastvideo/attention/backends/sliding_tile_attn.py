"""Sliding-tile attention (STA) on PyTorch FlexAttention, for any latent grid and window.

Each query attends only to the keys in a window of tiles around its own tile (the pattern,
the tile-major layout and the block mask are in ``fastvideo.attention.sta_mask``). It changes
the result, so it is ``opt_in``: used only when asked for by name (``FastVideoArgs.
attention_backend="SLIDING_TILE_ATTN"`` with ``sta_tile`` / ``sta_window``, or the
``FASTVIDEO_ATTENTION_BACKEND`` environment variable with the default tile and window).

Kernels: on CUDA ``torch.compile(flex_attention)``, which skips the masked blocks. Elsewhere
FlexAttention's unfused reference path, which materialises the whole score matrix: exact and
fine for the small CPU shapes tests use (compiling on CPU costs ~15 s per shape).

``FASTVIDEO_FLEX_KERNEL_OPTIONS`` (JSON, e.g. ``{"BLOCK_M": 128, "BLOCK_N": 64, "num_warps":
8}``) passes FlexAttention's ``kernel_options`` on CUDA; ``bench/sta_kernel.py`` times the
candidates at a shape; without it, ``default_kernel_options``. ``BLOCK_M`` must divide the
block mask's query block and ``BLOCK_N`` its key block (64 and 64 by default).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

from fastvideo import envs
from fastvideo.attention.backends.abstract import (
    AttentionBackend,
    AttentionImpl,
    VideoGrid,
    _Backend,
)
from fastvideo.attention.sta_mask import SlidingTileConfig, sliding_tile_config, sta_plan


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _largest_tile(block: int, sizes: tuple[int, ...]) -> int | None:
    return next((size for size in sizes if block % size == 0), None)


def default_kernel_options(device: torch.device, config: SlidingTileConfig) -> dict:
    """FlexAttention's kernel options for STA on CUDA. Its kernel tiles must divide the
    block mask's blocks (its own default tiles, 128 x 64, do not divide blocks of 64), and
    tl.dot needs tiles of at least 16. On Hopper (sm90) also TMA loads and q pre-scaled by the
    softmax scale, measured with 64 x 64 tiles and 4 warps for the default blocks of 64
    (128 x 64, 8 warps for query blocks of 128): bench/sta_kernel.py at the 1.3B shape on an
    H100, 2.69 ms per call vs 3.78 for FlexAttention's own blocks and choice; pre-scaling
    rounds q * scale to bf16 once, within one bf16 unit of the output."""
    block_m = _largest_tile(config.block_size, (128, 64, 32, 16))
    block_n = _largest_tile(config.kv_block_size, (64, 32, 16))
    if block_m is None or block_n is None:
        raise ValueError(
            f"sliding-tile attention on CUDA needs block sizes that are multiples of 16, got "
            f"block_size={config.block_size} and kv_block_size={config.kv_block_size}"
        )
    options = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 8 if block_m == 128 else 4}
    measured = block_m in (64, 128) and block_n == 64
    # Measured with torch 2.11; older FlexAttention may not know these options.
    recent = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 10)
    if measured and recent and torch.cuda.get_device_capability(device) == (9, 0):
        options.update(num_stages=3, USE_TMA=True, PRESCALE_QK=True)
    return options


def _compiler_runs() -> bool:
    """Whether torch.compile(flex_attention) will run the compiled kernel rather than fall
    back to eager (Dynamo disabled by config, environment or the force_eager stance)."""
    if os.environ.get("TORCHDYNAMO_DISABLE", "") not in ("", "0"):
        return False
    import torch._dynamo

    if torch._dynamo.config.disable:
        return False
    stance = getattr(getattr(torch._dynamo, "eval_frame", None), "_stance", None)
    return getattr(stance, "stance", "default") != "force_eager"


def _flex_attention(query, key, value, config: SlidingTileConfig, plan, **kwargs) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    if query.is_cuda:
        # The padding-only mask is right only inside the compiled block-sparse kernel.
        kwargs["block_mask"] = (
            plan.sparse_kernel_block_mask if _compiler_runs() else plan.block_mask
        )
        options = envs.FASTVIDEO_FLEX_KERNEL_OPTIONS.get()
        if options is None:
            options = default_kernel_options(query.device, config)
        kwargs["kernel_options"] = dict(options)  # a copy: the cached dict stays pristine
        return _compiled_flex_attention()(query, key, value, **kwargs)
    with warnings.catch_warnings():
        # The unfused path is the intended one off CUDA; its "use torch.compile" hint is noise.
        warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
        return flex_attention(query, key, value, block_mask=plan.block_mask, **kwargs)


class SlidingTileAttnImpl(AttentionImpl):
    needs_video_grid = True

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        softmax_scale: float,
        causal: bool = False,
        dropout_rate: float = 0.0,
        num_kv_heads: int | None = None,
        config: SlidingTileConfig | None = None,
    ) -> None:
        super().__init__(num_heads, head_size, softmax_scale, causal, dropout_rate, num_kv_heads)
        if causal or dropout_rate:
            raise ValueError("sliding-tile attention is non-causal and has no dropout")
        self.config = sliding_tile_config() if config is None else config

    def token_arrangement(self, video_grid: VideoGrid, device: torch.device):
        """The plan whose ``query_rows`` / ``key_rows`` / ``key_token_of_slot`` say where
        q, k and v go for ``forward(..., arranged=True)``: a producer that writes them there
        itself saves this backend three gathers."""
        return sta_plan(video_grid.shape, video_grid.extra_tokens, self.config, device)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        video_grid: VideoGrid | None = None,
        arranged: bool = False,
    ) -> torch.Tensor:
        """(B, Sq, H, D) queries, (B, N, H_kv, D) keys/values -> (B, Sq, H, D). The ``N``
        tokens are ``video_grid``'s; queries past them (sequence-parallel padding) get zeros.
        ``arranged``: q, k and v are already in ``token_arrangement``'s rows (B, L, H, D)."""
        if video_grid is None:
            raise ValueError("sliding-tile attention needs video_grid= (where the tokens sit)")
        n = video_grid.num_tokens
        plan = sta_plan(video_grid.shape, video_grid.extra_tokens, self.config, query.device)
        if arranged:
            lq, lkv = plan.query_rows.length, plan.key_rows.length
            if query.shape[1] != lq or key.shape[1] != lkv or value.shape[1] != lkv:
                raise ValueError(
                    f"arranged sliding-tile attention over {video_grid} expects {lq} query "
                    f"and {lkv} key/value rows, got {query.shape[1]}, {key.shape[1]} and "
                    f"{value.shape[1]}"
                )
            q, k, v = (t.transpose(1, 2) for t in (query, key, value))
            padded_queries = 0
        elif key.shape[1] != n or value.shape[1] != n or query.shape[1] < n:
            raise ValueError(
                f"sliding-tile attention over {video_grid} expects {n} keys and values and at "
                f"least {n} queries, got {key.shape[1]}, {value.shape[1]} and {query.shape[1]}"
            )
        else:
            q = plan.queries_to_tile_major(query[:, :n])  # (B, H, Lq, D)
            k, v = plan.keys_to_tile_major(key), plan.keys_to_tile_major(value)
            padded_queries = query.shape[1] - n  # sequence-parallel padding
        out = _flex_attention(
            q,
            k,
            v,
            self.config,
            plan,
            scale=self.softmax_scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        out = plan.from_tile_major(out)  # (B, n, H, D)
        if padded_queries:
            out = torch.cat([out, out.new_zeros(out.shape[0], padded_queries, *out.shape[2:])], 1)
        return out


class SlidingTileAttnBackend(AttentionBackend):
    opt_in = True

    @staticmethod
    def get_enum() -> _Backend:
        return _Backend.SLIDING_TILE_ATTN

    @staticmethod
    def unavailable_reason() -> str | None:
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return f"torch {torch.__version__} has no FlexAttention (needs torch >= 2.5)"
        return None

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        return SlidingTileAttnImpl
