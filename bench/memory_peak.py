"""What is alive at the peak of one DiT forward: ours vs diffusers at the Wan2.1-1.3B shape.

Records the CUDA caching allocator's history over one bf16 forward of each model (after a
warm-up), replays it to the moment the allocated bytes peak, and prints the largest live
blocks there with the innermost frame of this repository or diffusers that allocated them.

    python -m bench.memory_peak [--shape 1.3b] [--top 12] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.dit_step import SHAPES, build_models


def _where(frames: list[dict]) -> str:
    for frame in frames:
        name = frame.get("filename", "")
        if "/fastvideo/" in name or "/diffusers/" in name:
            return f"{name.split('/')[-1]}:{frame.get('line')} {frame.get('name')}"
    return frames[0].get("name", "?") if frames else "?"


def peak_blocks(fn, top: int) -> dict:
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    fn()
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    live: dict[int, tuple[int, str]] = {}
    current = peak = 0
    peak_live: dict[int, tuple[int, str]] = {}
    for trace in snapshot["device_traces"]:
        for event in trace:
            action, addr, size = event["action"], event["addr"], event["size"]
            if action == "alloc":
                live[addr] = (size, _where(event.get("frames", [])))
                current += size
                if current > peak:
                    peak, peak_live = current, dict(live)
            elif action in ("free_requested", "free") and addr in live:
                current -= live.pop(addr)[0]
    blocks = sorted(peak_live.values(), reverse=True)[:top]
    return {
        "base_gib": base / 2**30,
        "forward_peak_over_base_gib": peak / 2**30,
        "largest_live_at_peak": [{"mib": round(s / 2**20, 1), "where": w} for s, w in blocks],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.3b")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--json", default=None)
    ns = parser.parse_args()
    reference, ours = build_models(ns.shape)
    frames, height, width = SHAPES[ns.shape]["latent"]
    gen = torch.Generator("cuda").manual_seed(0)
    latents = torch.randn(1, 16, frames, height, width, device="cuda", generator=gen).bfloat16()
    text = torch.randn(1, 512, 4096, device="cuda", generator=gen).bfloat16()
    timestep = torch.tensor([999.0], device="cuda")
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    with torch.inference_mode():
        results["diffusers"] = peak_blocks(
            lambda: reference(latents, timestep, text, return_dict=False)[0], ns.top
        )
        results["ours"] = peak_blocks(lambda: ours(latents, timestep, text), ns.top)
    for name in ("diffusers", "ours"):
        r = results[name]
        peak = r["forward_peak_over_base_gib"]
        print(f"{name}: peak over what was allocated before = {peak:.3f} GiB")
        for block in r["largest_live_at_peak"]:
            print(f"   {block['mib']:8.1f} MiB  {block['where']}")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
