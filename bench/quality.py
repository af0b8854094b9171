"""Speed against fidelity for the approximate options: sliding-tile attention and step caching.

Every configuration renders the same prompts with the same seeds through ``VideoGenerator``
from one model folder; the dense, uncached run is the reference. Per configuration: denoise
seconds and s / step (median of steps 2..N), denoise speed-up over dense, PSNR and SSIM of the
decoded frames against dense (mean over prompts), and for step caching the DiT forwards it
computed and skipped. s / step is the mean (denoise s / steps): with step caching the steps
are not alike, and a median would show a computed or a skipped step, not the average.

With random weights (``bench.random_wan``) the videos are not pictures, so the
fidelity figures measure how far each option moves the output, not how good it looks; on a
real checkpoint the same command gives the real trade-off.

    python -m bench.quality --build-dir /tmp/rw --steps 20 \\
        --configs dense,sta:3.3.3,cache:0.08,cache:0.15 --prompts 2 --json out.json
    python -m bench.quality --device cpu --size tiny --steps 3 --configs dense,sta:1.1.1,cache:0.5

Configurations: ``dense``; ``sta:T.H.W`` (SLIDING_TILE_ATTN, window in tiles, default 6x8x8
tiles); ``cache:X`` (``step_cache_threshold=X``); ``compile`` (``enable_torch_compile``);
joined with ``+`` (``sta:3.3.3+compile``). Each configuration loads once and renders a
one-step warm-up at the measured shape first (FlexAttention and torch.compile build their
kernels for the shape there), then the prompts.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.e2e import (
    NEGATIVE_PROMPT,
    build_parser,
    environment,
    free_memory,
    model_folder,
    quiet_libraries,
    request_shape,
    summarize_steps,
    synchronize,
)

PROMPTS = (
    "A cat and a dog baking a cake together in a sunlit kitchen, flour in the air",
    "A drone shot over a rocky coastline at sunset, waves breaking on the cliffs",
    "A red vintage car driving through a neon-lit city street in the rain at night",
    "Close-up of a hummingbird hovering beside a purple flower, slow motion",
)


def engine_args_of(config: str) -> dict[str, Any]:
    """``sta:3.3.3+cache:0.1`` -> FastVideoArgs keyword arguments."""
    args: dict[str, Any] = {}
    for part in config.split("+"):
        name, _, value = part.partition(":")
        if name == "dense" and not value:
            continue
        if name == "sta":
            args["attention_backend"] = "SLIDING_TILE_ATTN"
            if value:
                args["sta_window"] = tuple(int(v) for v in value.split("."))
        elif name == "cache" and value:
            args["step_cache_threshold"] = float(value)
        elif name == "compile" and not value:
            args["enable_torch_compile"] = True
        else:
            raise ValueError(
                f"configuration part {part!r}: expected dense, sta[:T.H.W], cache:X or compile"
            )
    return args


def psnr(test: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of frames in [0, 1] (inf when equal)."""
    mse = float(np.mean((test.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(test: np.ndarray, reference: np.ndarray, device: str = "cpu") -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data
    range 1) over every frame and RGB channel of (T, H, W, 3) frames in [0, 1]."""
    x, y = (
        torch.from_numpy(np.ascontiguousarray(a)).to(device, torch.float64).permute(0, 3, 1, 2)
        for a in (test, reference)
    )
    channels = x.shape[1]
    coords = torch.arange(11, dtype=torch.float64, device=device) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(channels, 1, 11, 11)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)  # "valid": no padded borders

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return float((num / den).mean())


def render_config(
    folder: Path, config: str, requests: list[dict[str, Any]], ns
) -> tuple[dict[str, Any], list[np.ndarray]]:
    from fastvideo import VideoGenerator

    device = ns.device
    args = {**ns.engine_args, **engine_args_of(config)}
    started = time.perf_counter()
    generator = VideoGenerator.from_pretrained(folder, device=device, **args)
    result: dict[str, Any] = {"engine_args": args, "load_s": time.perf_counter() - started}
    frames, denoise, steps, counters = [], [], [], []
    try:
        synchronize(device)
        started = time.perf_counter()
        generator.generate_video(**{**requests[0], "num_inference_steps": 1}, return_frames=False)
        synchronize(device)
        result["warmup_s"] = time.perf_counter() - started
        for request in requests:
            marks: list[float] = []

            def on_step(progress, _marks=marks):
                synchronize(device)
                _marks.append(time.perf_counter())

            synchronize(device)
            started = time.perf_counter()
            out = generator.generate_video(**request, callback=on_step)
            durations = [b - a for a, b in zip([started, *marks[:-1]], marks, strict=True)]
            frames.append(out.frames)
            denoise.append(out.stage_timings["denoising_stage"])
            steps.append(summarize_steps(durations)["step_s_median"])
            cache = generator.pipeline.denoising_stage.step_cache
            if cache is not None:
                counters.append(cache.counters)
    finally:
        generator.close()
    result.update(
        denoise_s=float(np.mean(denoise)),
        step_s_mean=float(np.mean(denoise)) / requests[0]["num_inference_steps"],
        step_s_median=float(np.median(steps)),
    )
    if counters:
        result["step_cache"] = counters
        result["forwards_computed"] = sum(
            branch["computed"] for c in counters for branch in c.values()
        )
        result["forwards_skipped"] = sum(
            branch["skipped"] for c in counters for branch in c.values()
        )
    del generator
    free_memory(device)
    return result, frames


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"{results['gpu']}, torch {results['torch']}, {results['video']} frames x H x W, "
        f"{results['steps']} steps, {len(results['prompts'])} prompts:",
        "",
        "| configuration | denoise s | s / step | speed-up | PSNR dB | SSIM | forwards "
        "computed / skipped |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results["configs"].items():
        forwards = (
            f"{r['forwards_computed']} / {r['forwards_skipped']}"
            if "forwards_computed" in r
            else "-"
        )
        lines.append(
            f"| {name} | {r['denoise_s']:.2f} | {r['step_s_mean']:.3f} | "
            f"{r['speedup_denoise']:.2f}x | {r['psnr_db']:.1f} | {r['ssim']:.4f} | {forwards} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = build_parser(__doc__.split("\n")[0])
    parser.add_argument("--configs", default="dense,sta:3.3.3,cache:0.08,cache:0.15")
    parser.add_argument("--prompts", type=int, default=2, help=f"first N of {len(PROMPTS)}")
    ns = parser.parse_args()
    quiet_libraries()
    configs = ns.configs.split(",")
    if configs[0] != "dense":
        configs.insert(0, "dense")  # the reference comes first
    for config in configs:
        engine_args_of(config)  # fail on a typo before loading anything
    folder = model_folder(ns, ns.size)
    frames, height, width = request_shape(ns, ns.size)
    requests = [
        dict(
            prompt=prompt,
            negative_prompt=NEGATIVE_PROMPT,
            height=height,
            width=width,
            num_frames=frames,
            num_inference_steps=ns.steps,
            guidance_scale=ns.guidance_scale,
            seed=ns.seed + index,
        )
        for index, prompt in enumerate(PROMPTS[: ns.prompts])
    ]
    results: dict[str, Any] = {
        **environment(ns.device),
        "model_folder": str(folder),
        "video": [frames, height, width],
        "steps": ns.steps,
        "guidance_scale": ns.guidance_scale,
        "prompts": [r["prompt"] for r in requests],
        "configs": {},
    }
    reference: list[np.ndarray] | None = None
    for config in configs:
        result, outputs = render_config(folder, config, requests, ns)
        if reference is None:
            reference = outputs
        dense = results["configs"].get("dense", result)
        result["speedup_denoise"] = dense["denoise_s"] / result["denoise_s"]
        pairs = list(zip(outputs, reference, strict=True))
        result["psnr_db"] = float(np.mean([psnr(o, r) for o, r in pairs]))
        result["ssim"] = float(np.mean([ssim(o, r, ns.device) for o, r in pairs]))
        results["configs"][config] = result
        print(json.dumps({config: result}), flush=True)
        if ns.json:  # partial results survive a run cut short
            Path(ns.json).write_text(json.dumps(results, indent=2))
    print()
    print(markdown(results))
    if ns.json:
        Path(ns.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
