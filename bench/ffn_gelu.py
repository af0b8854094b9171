"""The DiT feed-forward's first projection and GELU-tanh: GEMM then our in-place Triton GELU,
against cuBLASLt's GEMM with a bias + GELU epilogue (``torch._addmm_activation``), at the
Wan2.1-1.3B shape (32,760 tokens, 1536 -> 8960, bf16). Median ms of 20 calls, and the max
difference between the two (the epilogue applies GELU to the float32 accumulator before
rounding; the two-step path rounds to bf16 first).

    python -m bench.ffn_gelu [--tokens 32760] [--dim 1536] [--hidden 8960]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.sta_kernel import median_ms
from fastvideo.layers.fused_ops import gelu_


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32760)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--hidden", type=int, default=8960)
    ns = parser.parse_args()
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(ns.tokens, ns.dim, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(ns.hidden, ns.dim, device="cuda", generator=gen) * ns.dim**-0.5).bfloat16()
    b = torch.randn(ns.hidden, device="cuda", generator=gen).bfloat16()

    def two_step():
        return gelu_(F.linear(x, w, b), "tanh")

    def epilogue():
        return torch._addmm_activation(b, x, w.t(), use_gelu=True)

    def linear_only():
        return F.linear(x, w, b)

    with torch.inference_mode():
        diff = (two_step().float() - epilogue().float()).abs().max().item()
        rows = {
            "GEMM + bias alone": median_ms(linear_only, 20),
            "GEMM + bias, then Triton GELU in place": median_ms(two_step, 20),
            "cuBLASLt GEMM with bias + GELU epilogue": median_ms(epilogue, 20),
        }
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {ns.tokens} x {ns.dim} "
        f"-> {ns.hidden}, bf16; max |two-step - epilogue| = {diff:.4f}"
    )
    print("| path | ms |\n| --- | --- |")
    for label, ms in rows.items():
        print(f"| {label} | {ms:.3f} |")


if __name__ == "__main__":
    main()
