"""Sliding-tile attention alone: FlexAttention ``kernel_options`` candidates against dense SDPA.

One attention call at the Wan2.1-1.3B shape (12 heads x 128, latent 21x30x52 tokens after
patching, 32,760 tokens), bf16, 6x8x8 tiles, a (3, 3, 3) window, tiles padded to key blocks
of 128 (FlexAttention's) or 64 (the default), queries to blocks of 128 or 64: median ms of
10 calls after warm-up (each candidate compiles its own kernel first), against
``F.scaled_dot_product_attention`` (cuDNN) on the same tensors, and the max difference from
the default candidate's output. The fastest candidate is printed as the JSON to put in
``FASTVIDEO_FLEX_KERNEL_OPTIONS``.

    python -m bench.sta_kernel [--window 3,3,3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

TMA = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "USE_TMA": True}
SMALL = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
# (query block, key block) of the layout, kernel_options. BLOCK_M must divide the query
# block, BLOCK_N the key block; smaller query blocks mean less padding (fewer wasted rows).
CANDIDATES = (
    ((128, 128), None),  # FlexAttention's own blocks and choice
    ((128, 128), TMA),
    ((128, 64), {**TMA, "PRESCALE_QK": True}),
    ((64, 64), SMALL),
    ((64, 64), {**SMALL, "USE_TMA": True}),
    ((64, 64), {**SMALL, "USE_TMA": True, "PRESCALE_QK": True}),  # the default on Hopper
    # The same, with the whole tile rule as mask_mod on the partial blocks instead of the
    # padding-key test: what the cheaper mask saves.
    ((64, 64), {**SMALL, "USE_TMA": True, "PRESCALE_QK": True}, "whole rule"),
)


def median_ms(fn, repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    from torch.nn.attention.flex_attention import flex_attention

    from fastvideo.attention.sta_mask import SlidingTileConfig, sta_plan

    parser = argparse.ArgumentParser()
    parser.add_argument("--window", default="3,3,3")
    parser.add_argument("--json", default=None)
    ns = parser.parse_args()
    window = tuple(int(w) for w in ns.window.split(","))
    grid, heads, dim = (21, 30, 52), 12, 128
    plans = {
        blocks: sta_plan(
            grid, 0, SlidingTileConfig((6, 8, 8), window, *blocks), torch.device("cuda")
        )
        for blocks in sorted({candidate[0] for candidate in CANDIDATES})
    }
    n = grid[0] * grid[1] * grid[2]
    gen = torch.Generator("cuda").manual_seed(0)
    q, k, v = (
        torch.randn(1, n, heads, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
        for _ in range(3)
    )
    dense = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    results = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "window": list(window),
        "dense_work_fraction": {
            f"{q}x{kv}": p.layout.dense_work_fraction for (q, kv), p in plans.items()
        },
        "dense_sdpa_ms": median_ms(lambda: F.scaled_dot_product_attention(*dense)),
        "candidates": [],
    }
    # One compile per candidate: lift Dynamo's recompile limit (8 by default) above their count.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    compiled = torch.compile(flex_attention)
    # FlexAttention without a mask, on the same tensors as dense SDPA: its efficiency on
    # dense work, against which the sparse rows' "fraction of blocks vs fraction of time" reads.
    results["dense_flex_ms"] = median_ms(lambda: compiled(*dense, kernel_options=TMA))
    reference = None
    for blocks, options, *whole_rule in CANDIDATES:
        plan = plans[blocks]
        qt = plan.queries_to_tile_major(q)
        kt, vt = plan.keys_to_tile_major(k), plan.keys_to_tile_major(v)
        mask = plan.block_mask if whole_rule else plan.sparse_kernel_block_mask
        kwargs = {"block_mask": mask}
        if options is not None:
            kwargs["kernel_options"] = options
        row = {"blocks": list(blocks), "kernel_options": options, "mask_mod": "whole rule"}
        if not whole_rule:
            row["mask_mod"] = "padding keys"
        try:
            started = time.perf_counter()
            out = compiled(qt, kt, vt, **kwargs)
            torch.cuda.synchronize()
            row["compile_s"] = time.perf_counter() - started
            row["ms"] = median_ms(lambda a=(qt, kt, vt), kw=kwargs: compiled(*a, **kw))
            out = plan.from_tile_major(out)  # token order: comparable across layouts
            reference = out if reference is None else reference
            row["max_abs_diff"] = (out.float() - reference.float()).abs().max().item()
        except Exception as err:  # a candidate the kernel rejects at this shape
            row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        results["candidates"].append(row)
        print(json.dumps(row), flush=True)
    timed = [r for r in results["candidates"] if "ms" in r]
    best = min(timed, key=lambda r: r["ms"])
    results["best"] = {"blocks": best["blocks"], "kernel_options": best["kernel_options"]}
    print(
        f"\n{results['gpu']}, torch {results['torch']}, window {window}, work vs dense by "
        f"(query, key) block {results['dense_work_fraction']}: dense SDPA "
        f"{results['dense_sdpa_ms']:.2f} ms, "
        f"dense FlexAttention {results['dense_flex_ms']:.2f} ms"
    )
    print("| query x key block | kernel_options | mask_mod | ms | vs dense | compile s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in timed:
        print(
            f"| {r['blocks'][0]}x{r['blocks'][1]} | {json.dumps(r['kernel_options'])} | "
            f"{r['mask_mod']} | "
            f"{r['ms']:.2f} | "
            f"{results['dense_sdpa_ms'] / r['ms']:.2f}x | {r['compile_s']:.1f} |"
        )
    print("BEST", json.dumps(best["kernel_options"]))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
