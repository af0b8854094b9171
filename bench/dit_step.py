"""DiT forward and full denoising step: ours vs diffusers, same weights, same GPU, same run.

Random weights (speed does not depend on their values), bf16, the shapes of Wan2.1:
  1.3b: 81 frames at 480x832 -> latent 16x21x60x104 (32760 tokens), 30 layers, dim 1536
  14b:  81 frames at 720x1280 -> latent 16x21x90x160 (75600 tokens), 40 layers, dim 5120

Usage: python -m bench.dit_step --shape 1.3b [--repeats 5] [--compile] [--sta 3,3,3]
                                  [--ablation] [--profile] [--json out.json]

``--compile`` adds both models with their transformer blocks compiled (regional compile;
the compile time is reported). ``--sta W`` adds our model with sliding-tile attention,
tiles of 6x8x8 latent tokens and a window of W tiles per axis, with its block sparsity and
its difference from our dense output. ``--ablation`` adds ours with the fused Triton kernels
off (``fastvideo.layers.fused_ops``), ``--profile`` the CUDA kernel time of one eager forward
of each, split into attention, matrix multiplies and everything else.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch

SHAPES = {
    "1.3b": dict(
        config=dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
        latent=(21, 60, 104),
    ),
    "14b": dict(
        config=dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
        latent=(21, 90, 160),
    ),
    # CPU smoke test only (tests/test_bench_smoke.py): every code path, tiny sizes.
    "tiny": dict(
        config=dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=64, num_layers=2),
        latent=(3, 8, 12),
    ),
}
DEVICE = "cuda"  # --device cpu for the smoke test


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


COMMON = dict(in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, patch_size=(1, 2, 2))


def _keep_fp32(model: torch.nn.Module, names) -> None:
    for name, param in model.named_parameters():
        if any(part in names for part in name.split(".")):
            param.data = param.data.float()


def build_ours(shape: str, reference, attention_backend=None, sliding_tile=None):
    from fastvideo.attention.selector import forced_attention_backend
    from fastvideo.models.dits.wanvideo import WanTransformer3DModel
    from fastvideo.models.loader.weight_utils import load_weights_into_model

    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE), forced_attention_backend(attention_backend, sliding_tile):
            ours = WanTransformer3DModel(**COMMON, **SHAPES[shape]["config"]).eval()
    finally:
        torch.set_default_dtype(saved)
    _keep_fp32(ours, ours._keep_in_fp32_modules)
    load_weights_into_model(ours, reference.state_dict().items(), component="transformer")
    return ours.requires_grad_(False)


def build_models(shape: str):
    from diffusers import WanTransformer3DModel as DiffusersWan

    config = {**COMMON, **SHAPES[shape]["config"]}
    torch.manual_seed(0)
    with torch.device(DEVICE):
        reference = DiffusersWan(**config).to(torch.bfloat16).eval()
    # What diffusers' from_pretrained(torch_dtype=bf16) does.
    _keep_fp32(reference, reference._keep_in_fp32_modules)
    ours = build_ours(shape, reference)
    return reference.requires_grad_(False), ours.requires_grad_(False)


def kernel_breakdown(fn) -> dict:
    """CUDA kernel milliseconds of one call of ``fn``: attention, matmul, other (and the
    largest "other" kernels by name)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    totals = {"attention_ms": 0.0, "matmul_ms": 0.0, "other_ms": 0.0}
    others = []
    for event in prof.key_averages():
        name = event.key.lower()
        ms = event.self_device_time_total / 1e3
        if ms <= 0:
            continue
        if any(k in name for k in ("flash", "fmha", "sdpa", "attention", "flex")):
            totals["attention_ms"] += ms
        elif any(k in name for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul")):
            totals["matmul_ms"] += ms
        else:
            totals["other_ms"] += ms
            others.append((round(ms, 1), event.key[:80]))
    result: dict = {k: round(v, 1) for k, v in totals.items()}
    result["top_other"] = sorted(others, reverse=True)[:8]
    return result


def fastvideo_peer(site: str, shape: str, repeats: int, warmup: int) -> dict:
    """FastVideo's DiT forward, from bench/fastvideo_peer.py in its own process: FastVideo's
    install (``site``) first on PYTHONPATH and this repository (our ``fastvideo``) off it."""
    import subprocess
    import sys
    import tempfile

    here = Path(__file__).resolve().parent
    ours = here.parent
    keep = [
        entry
        for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if entry and Path(entry).resolve() != ours
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([site, *keep])}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peer.json"
        command = [sys.executable, str(here / "fastvideo_peer.py"), "--shape", shape]
        command += ["--repeats", str(repeats), "--warmup", str(warmup), "--json", str(out)]
        done = subprocess.run(command, env=env, cwd=tmp, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            return {"error": (done.stderr or done.stdout)[-2000:]}
        return json.loads(out.read_text())


def time_call(fn, repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median seconds over ``repeats`` calls after ``warmup``, and peak GiB allocated."""
    for _ in range(warmup):
        fn()
    sync()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.3b")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--compile", action="store_true", help="also time compiled blocks")
    parser.add_argument("--sta", default=None, help="sliding-tile window, e.g. 3,3,3")
    parser.add_argument("--step-repeats", type=int, default=3, help="CFG steps timed")
    parser.add_argument("--no-cfg-step", action="store_true", help="time forwards only")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ablation", action="store_true", help="also ours without kernels")
    parser.add_argument("--profile", action="store_true", help="kernel time breakdown")
    parser.add_argument("--sta-only", action="store_true", help="with --sta: only the STA rows")
    parser.add_argument(
        "--fastvideo-site",
        default=None,
        help="also time FastVideo's DiT from this install dir (bench/fastvideo_peer.py)",
    )
    parser.add_argument(
        "--sta-blocks",
        default="64x64",
        help="with --sta: (query x key) block sizes to time, e.g. 64x64,128x128",
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ns = parser.parse_args()
    global DEVICE
    DEVICE = ns.device
    from diffusers import UniPCMultistepScheduler

    from fastvideo.layers.fused_ops import fused_kernels
    from fastvideo.models.compile import compile_blocks

    reference, ours = build_models(ns.shape)
    frames, height, width = SHAPES[ns.shape]["latent"]
    gen = torch.Generator(DEVICE).manual_seed(0)
    latents = torch.randn(1, 16, frames, height, width, device=DEVICE, generator=gen)
    text = torch.randn(1, 512, 4096, device=DEVICE, generator=gen).bfloat16()
    negative = torch.randn(1, 512, 4096, device=DEVICE, generator=gen).bfloat16()
    timestep = torch.tensor([999.0], device=DEVICE)

    def forward(model, is_ours):
        def run():
            with torch.inference_mode():
                x = latents.bfloat16()
                if is_ours:
                    return model(x, timestep, text)
                return model(x, timestep, text, return_dict=False)[0]

        return run

    def full_step(model, is_ours):
        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        )
        scheduler.set_timesteps(50, device=DEVICE)

        def run():
            with torch.inference_mode():
                x = latents.bfloat16()
                t = scheduler.timesteps[0].expand(1)
                if is_ours:
                    cond, uncond = model(x, t, text), model(x, t, negative)
                else:
                    cond = model(x, t, text, return_dict=False)[0]
                    uncond = model(x, t, negative, return_dict=False)[0]
                pred = uncond + 5.0 * (cond - uncond)
                scheduler._step_index = None  # every call is "the first step" again
                return scheduler.step(pred, scheduler.timesteps[0], latents, return_dict=False)[0]

        return run

    with torch.inference_mode():
        diff = (forward(ours, True)().float() - forward(reference, False)().float()).abs().max()
    results = {
        "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": ns.shape,
        "latent": [16, frames, height, width],
        "tokens": frames * height * width // 4,
        "max_abs_diff_vs_diffusers": diff.item(),
    }
    systems = [("diffusers eager", reference, False), ("ours eager", ours, True)]
    if ns.sta_only:
        systems = []
    if ns.ablation:
        systems.append(("ours eager, fused kernels off", ours, True))
    if ns.sta:
        from fastvideo.attention.sta_mask import SlidingTileConfig, tile_layout

        window = tuple(int(w) for w in ns.sta.split(","))
        grid = (frames, height // 2, width // 2)
        results["sta_window"] = list(window)
        with torch.inference_mode():
            dense_out = forward(ours, True)().float()
        default = SlidingTileConfig(tile=(6, 8, 8), window=window)
        for blocks in ns.sta_blocks.split(","):
            q_block, kv_block = (int(b) for b in blocks.split("x"))
            config = SlidingTileConfig((6, 8, 8), window, q_block, kv_block)
            sta = build_ours(ns.shape, reference, "SLIDING_TILE_ATTN", config)
            layout = tile_layout(grid, 0, config)
            is_default = config == default
            label = f"ours STA {ns.sta}" + ("" if is_default else f", blocks {blocks}")
            results[f"{label}_block_sparsity"] = layout.block_sparsity
            results[f"{label}_dense_work_fraction"] = layout.dense_work_fraction
            with torch.inference_mode():
                sta_out = forward(sta, True)().float()
            diff = (sta_out - dense_out).abs().max().item()
            results[f"{label}_max_abs_diff_vs_dense"] = diff
            if is_default:
                results["sta_block_sparsity"] = layout.block_sparsity
                results["sta_max_abs_diff_vs_dense"] = diff
            systems.append((label, sta, True))
    if ns.compile:
        # Blocks are compiled in place when their turn comes, after every eager figure.
        systems += [
            (f"{label.removesuffix(' eager')} compiled", m, o)
            for label, m, o in systems
            if "kernels off" not in label
        ]
    labels = []
    for label, model, is_ours in systems:
        compiled = label.endswith(" compiled")
        kernels = fused_kernels(False) if "kernels off" in label else contextlib.nullcontext()
        with kernels:
            if ns.profile and not compiled:
                results[f"{label}_kernels"] = kernel_breakdown(forward(model, is_ours))
                print(label, results[f"{label}_kernels"], flush=True)
            if compiled:
                started = time.perf_counter()
                compile_blocks(model)
                with torch.inference_mode():
                    forward(model, is_ours)()
                sync()
                results[f"{label}_compile_s"] = time.perf_counter() - started
            labels.append(label)
            seconds, peak = time_call(forward(model, is_ours), ns.repeats, ns.warmup)
            results[f"{label}_forward_s"] = seconds
            results[f"{label}_forward_peak_gib"] = peak
            if not ns.no_cfg_step:
                seconds, peak = time_call(full_step(model, is_ours), ns.step_repeats, 1)
                results[f"{label}_cfg_step_s"] = seconds
                results[f"{label}_cfg_step_peak_gib"] = peak
        print(label, f"{results[f'{label}_forward_s']:.3f} s / forward", flush=True)
        if ns.json:  # partial results survive a run cut short
            with open(ns.json, "w") as f:
                json.dump(results, f, indent=2)
    if ns.fastvideo_site:
        # Last, after our models are freed: FastVideo's process needs the GPU's memory too.
        reference = ours = sta = model = systems = None
        gc.collect()
        torch.cuda.empty_cache()
        peer = fastvideo_peer(ns.fastvideo_site, ns.shape, ns.repeats, ns.warmup)
        results["fastvideo"] = peer
        if "error" in peer:
            print("FastVideo peer failed:\n" + peer["error"], flush=True)
        for label, row in peer.get("rows", {}).items():
            label = f"{label} ({peer['fastvideo_version']})"
            labels.append(label)
            results[f"{label}_forward_s"] = row["forward_s"]
            results[f"{label}_forward_peak_gib"] = row["peak_gib"]
    print(json.dumps(results, indent=2))
    print(
        f"\n{results['gpu']}, torch {results['torch']}, Wan2.1-{ns.shape} shape "
        f"{results['latent']}:\n"
        f"| system | s / forward | s / CFG step | peak GiB |\n| --- | --- | --- | --- |\n"
        + "".join(
            f"| {label} | {results[f'{label}_forward_s']:.3f} | "
            f"{results.get(f'{label}_cfg_step_s', float('nan')):.3f} | "
            f"{results[f'{label}_forward_peak_gib']:.1f} |\n"
            for label in labels
        )
    )
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
