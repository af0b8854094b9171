"""Ring attention: each rank of a ring group holds one block of queries and one block of
keys/values; the key/value blocks travel around the ring while every rank attends its queries
to the block in hand and merges the partial results with their log-sum-exp (online softmax).

The ring ranks' blocks are consecutive pieces of one sequence whose first ``seq_len`` tokens
are real and the rest padding, so the padded keys are cut off each block by length, and a
block of padding alone is skipped. The send of the next block overlaps the attention on the
current one. Non-causal attention only (the video DiTs are bidirectional).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastvideo.distributed.parallel_state import _GroupCoordinates


@functools.cache
def _flash_attn_func():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_func

    return flash_attn_func


def _use_cudnn(q: torch.Tensor) -> bool:
    """cuDNN's fused attention: what SDPA itself picks on Hopper, about 1.6x faster there than
    the flash kernel PyTorch ships (bf16, head_dim 128, H200)."""
    head_dim = q.shape[-1]
    return (
        torch.backends.cuda.cudnn_sdp_enabled()
        and torch.cuda.get_device_capability(q.device)[0] >= 9
        and head_dim % 8 == 0
        and head_dim <= 128
    )


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of (B, Sq, H, D) queries over (B, Sk, H, D) keys/values.

    Returns the output (B, Sq, H, D) in the input dtype and the log-sum-exp of the scaled
    scores (B, H, Sq) in float32, from the fused kernels that compute both in one pass.
    """
    half = q.dtype in (torch.float16, torch.bfloat16)
    if q.is_cuda and half and _flash_attn_func() is not None:
        out, lse, _ = _flash_attn_func()(q, k, v, softmax_scale=scale, return_attn_probs=True)
        return out, lse
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # kernels take (B, H, S, D)
    if not q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qt, kt, vt, scale=scale
        )
    elif half and _use_cudnn(q):
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            qt, kt, vt, None, True, scale=scale
        )[:2]
        lse = lse.view(lse.shape[:3])  # (B, H, S, 1) -> (B, H, S)
    elif half:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            qt, kt, vt, None, True, scale=scale
        )[:2]
        lse = lse[..., : q.shape[1]]  # the kernel pads its lse rows to a multiple of 32
    return out.transpose(1, 2), lse


def _merge(
    out: torch.Tensor | None,
    lse: torch.Tensor | None,
    block_out: torch.Tensor,
    block_lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax merge in float32; ``out`` (B, S, H, D), ``lse`` (B, S, H, 1)."""
    block_lse = block_lse.transpose(1, 2).unsqueeze(-1)
    if out is None:
        return block_out.float(), block_lse.float()
    # out = (e^lse * out + e^block_lse * block_out) / (e^lse + e^block_lse), stably.
    out = out - torch.sigmoid(block_lse - lse) * (out - block_out.float())
    lse = lse - F.logsigmoid(lse - block_lse)
    return out, lse


def ring_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    seq_len: int,
    scale: float,
    group: _GroupCoordinates,
) -> torch.Tensor:
    """Attention of this ring rank's queries (B, S, H, D) over every rank's keys/values.

    ``kv`` (2, B, S, H, D) is this rank's key/value block, block ``group.rank`` of the
    sequence; only the first ``seq_len`` tokens of the whole sequence are attended to.
    ``kv`` is consumed: it serves as a receive buffer.
    """
    size, rank = group.world_size, group.rank
    block = kv.shape[2]
    send_to = group.ranks[(rank + 1) % size]
    recv_from = group.ranks[(rank - 1) % size]
    current = kv.contiguous()  # point-to-point sends need it; a no-op for our callers
    spare = torch.empty_like(current) if size > 1 else None
    out = lse = None
    for step in range(size):
        pending = []
        if step < size - 1:
            pending = dist.batch_isend_irecv(
                [
                    dist.P2POp(dist.isend, current, send_to, group.group),
                    dist.P2POp(dist.irecv, spare, recv_from, group.group),
                ]
            )
        source = (rank - step) % size  # whose block ``current`` is
        valid = min(max(seq_len - source * block, 0), block)
        if valid:
            k, v = current[0, :, :valid], current[1, :, :valid]
            out, lse = _merge(out, lse, *attention_with_lse(q, k, v, scale))
        for request in pending:
            request.wait()
        if pending:
            current, spare = spare, current
    if out is None:
        raise ValueError(f"seq_len={seq_len} leaves no key to attend to")
    return out.to(q.dtype)
