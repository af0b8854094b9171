"""What is alive at the peak of one DiT forward (or VAE decode): ours vs diffusers.

Records the CUDA caching allocator's history over one bf16 forward of each model (after a
warm-up), replays it to the moment the allocated bytes peak, and prints the largest live
blocks there with the innermost frame of this repository or diffusers that allocated them.
cuDNN's convolution workspaces come from the same allocator, so they show up too.

    python -m bench.memory_peak [--shape 1.3b] [--top 12] [--json out.json]
    python -m bench.memory_peak --vae [--chunk-frames 4]   # fp32 decode of 16x21x60x104
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
    parser.add_argument("--vae", action="store_true", help="the Wan VAE decode instead")
    parser.add_argument("--chunk-frames", type=int, default=1, help="ours: decode chunk (--vae)")
    parser.add_argument("--json", default=None)
    ns = parser.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    with torch.inference_mode():
        if ns.vae:
            results.update(vae_peaks(ns.top, ns.chunk_frames))
        else:
            results.update(dit_peaks(ns.shape, ns.top))
    for name in ("diffusers", "ours"):
        r = results[name]
        peak = r["forward_peak_over_base_gib"]
        print(f"{name}: peak over what was allocated before = {peak:.3f} GiB")
        for block in r["largest_live_at_peak"]:
            print(f"   {block['mib']:8.1f} MiB  {block['where']}")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(results, f, indent=2)


def vae_peaks(top: int, chunk_frames: int) -> dict:
    """fp32 decode of 16x21x60x104 latents (81 frames at 480x832), random weights."""
    from diffusers import AutoencoderKLWan

    from bench.vae import build_ours

    torch.manual_seed(0)
    with torch.device("cuda"):
        reference = AutoencoderKLWan().eval().requires_grad_(False)
    ours = build_ours(dict(reference.config), reference.state_dict(), "cuda", torch.float32)
    ours.set_decode_chunk_frames(chunk_frames)
    z = torch.randn(1, 16, 21, 60, 104, device="cuda", generator=torch.Generator("cuda"))
    return {
        "diffusers": peak_blocks(lambda: reference.decode(z, return_dict=False)[0], top),
        "ours": peak_blocks(lambda: ours.decode(z), top),
    }


def dit_peaks(shape: str, top: int) -> dict:
    reference, ours = build_models(shape)
    frames, height, width = SHAPES[shape]["latent"]
    gen = torch.Generator("cuda").manual_seed(0)
    latents = torch.randn(1, 16, frames, height, width, device="cuda", generator=gen).bfloat16()
    text = torch.randn(1, 512, 4096, device="cuda", generator=gen).bfloat16()
    timestep = torch.tensor([999.0], device="cuda")
    return {
        "diffusers": peak_blocks(
            lambda: reference(latents, timestep, text, return_dict=False)[0], top
        ),
        "ours": peak_blocks(lambda: ours(latents, timestep, text), top),
    }


if __name__ == "__main__":
    main()
