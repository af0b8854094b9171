"""Sequence parallelism over NCCL on real GPUs (device machine; skipped without 2 GPUs).

bf16 bound: Ulysses and ring attention move tokens between GPUs but compute each head's
attention over the same keys; what changes is the row count of every GEMM (each rank
projects only its token slice) and, on the ring path, the order in which softmax partials
are merged in fp32. cuBLAS may pick another kernel for another row count, which moves a
rounding by one bf16 unit; a few such moves compound through the blocks. We allow 4 units
in the last place at the largest output value. The mean difference must stay below 1/50 of
a unit where only Ulysses runs (measured on 4 H200s: exactly 0) and below 1/8 of a unit
where ring attention runs: its fp32 online-softmax merge sums in another order than one
kernel, so many outputs round one unit apart at their own magnitude (measured: 1/20).
"""

from __future__ import annotations

import math

import pytest
import torch

from fastvideo.testing.distributed import run_on_ranks
from tests.engine_checks.gpu_checks import build_bf16_dit, dit_inputs, sp_dit_forward

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA devices")]


def _single_gpu_output(heads: int) -> torch.Tensor:
    model = build_bf16_dit("cuda:0", heads)
    x, t, text = dit_inputs("cuda:0")
    with torch.inference_mode():
        out = model(x, t, text).float().cpu()
    del model
    torch.cuda.empty_cache()
    return out


# 12 heads: Ulysses only. 2 heads with SP=4: Ulysses 2 x ring 2. 3 heads with SP=2: ring only.
@pytest.mark.parametrize(
    ("sp", "heads"),
    [(sp, h) for sp in (2, 4) if sp <= GPUS for h in (12, 2, 3) if h != 3 or sp == 2],
)
def test_bf16_sequence_parallel_dit_equals_one_gpu(sp, heads):
    single_gpu_output = _single_gpu_output(heads)
    outputs = run_on_ranks(sp_dit_forward, world_size=sp, args=(heads,), sp_size=sp, backend="nccl")
    scale = single_gpu_output.abs().max().item()
    ulp = 2.0 ** (math.floor(math.log2(scale)) - 7)
    for rank, out in enumerate(outputs):
        diff = (out - single_gpu_output).abs()
        print(
            f"SP={sp} heads={heads} rank {rank}: max {diff.max():.3e}, "
            f"mean {diff.mean():.3e}, ulp {ulp:.3e}"
        )
        assert diff.max().item() <= 4 * ulp
        ring = heads % sp != 0
        assert diff.mean().item() <= ulp / (8 if ring else 50)
