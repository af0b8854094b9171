"""Wan VAE decode: ours vs diffusers' ``AutoencoderKLWan``, same weights, same GPU, same run.

Default: the released Wan2.1 VAE config with random weights (speed does not depend on their
values), fp32 as the model card loads it, random latents of 16x21x60x104, which decode to 81
frames at 480x832.

    python -m bench.vae [--gpus 4] [--repeats 3] [--json out.json]
    python -m bench.vae --device cpu --tiny --gpus 2        # CPU smoke test (gloo ranks)

Rows: diffusers plain and with ``enable_tiling()``; ours plain and with ``enable_tiling()``
(same tiles: 256 px every 192 px unless ``--tile``); ours decoding ``--chunk-frames`` latent
frames per decoder call (default 4; 1 drops the row) and, with ``--channels-last``,
channels-last convolutions (exact: same math, other kernels); with ``--gpus N`` (N > 1), ours split
tile by tile over N ranks (one process per GPU, NCCL, the sequence-parallel group, every rank
ends with the whole video; the time is rank 0's from a barrier to the last rank's end).
Median of ``--repeats`` decodes after ``--warmup``; peak GiB is
``torch.cuda.max_memory_allocated`` over the timed decodes (weights, latents and output
included; for the split row the largest over the ranks). ``max |diff|`` is against diffusers
plain (the reference): tiling changes results near seams, so tiled rows are also compared
with diffusers tiled. cuDNN may use TF32 for convolutions (PyTorch's default, and what users
get); ``--no-tf32`` turns it off for an exactness check.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_TILE = (32, 32, 16, 16)  # tiny frames are 64x96: 32 px tiles every 16 px


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def vae_config(tiny: bool) -> dict[str, Any]:
    if not tiny:
        return {}  # diffusers' AutoencoderKLWan defaults: the Wan2.1 VAE
    from fastvideo.testing.tiny_wan import TinyWanConfig

    return TinyWanConfig().vae_kwargs()


def build_reference(ns: argparse.Namespace, dtype: torch.dtype):
    """diffusers' VAE: from ``--model-folder``/vae, else random weights built on the device."""
    from diffusers import AutoencoderKLWan

    if ns.model_folder:
        vae = AutoencoderKLWan.from_pretrained(ns.model_folder, subfolder="vae", torch_dtype=dtype)
        return vae.to(ns.device).eval().requires_grad_(False)
    torch.manual_seed(0)
    with torch.device(ns.device):
        vae = AutoencoderKLWan(**vae_config(ns.tiny))
    return vae.to(dtype).eval().requires_grad_(False)


def build_ours(config: dict[str, Any], state_dict: dict[str, torch.Tensor], device: str, dtype):
    from fastvideo.models.vaes.wanvae import AutoencoderKLWan

    with torch.device(device):
        vae = AutoencoderKLWan.from_config(config)
    vae.load_state_dict(state_dict, strict=True)
    return vae.to(dtype).eval().requires_grad_(False)


def time_decode(fn, device: str, repeats: int, warmup: int):
    """(median seconds, peak GiB or None, the last output on the CPU)."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        _sync(device)
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        out = None
        for _ in range(repeats):
            out = None  # free the previous output before the next decode
            started = time.perf_counter()
            out = fn()
            _sync(device)
            times.append(time.perf_counter() - started)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        return statistics.median(times), peak, out.float().cpu()


def kernel_profile(fn, top: int = 8) -> dict[str, Any]:
    """CUDA kernel ms of one decode: convolutions (cuDNN / implicit GEMM kernels) vs the
    rest, and the ``top`` kernels by time."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    rows = [(e.self_device_time_total / 1e3, e.key) for e in prof.key_averages()]
    rows = sorted((r for r in rows if r[0] > 0), reverse=True)
    conv_words = ("conv", "cudnn", "xmma", "implicit", "gemm", "cutlass", "sm90", "nhwc")
    conv = sum(ms for ms, name in rows if any(w in name.lower() for w in conv_words))
    return {
        "conv_ms": round(conv, 1),
        "other_ms": round(sum(ms for ms, _ in rows) - conv, 1),
        "top": [(round(ms, 1), name[:90]) for ms, name in rows[:top]],
    }


def _split_rank(
    config: dict[str, Any],
    weights_path: str,
    z: torch.Tensor,
    tile: tuple[int, int, int, int] | None,
    dtype_name: str,
    repeats: int,
    warmup: int,
    video_path: str,
) -> dict[str, Any]:
    """One rank of the split decode (run by ``run_on_ranks``; the SP group spans all ranks)."""
    import torch.distributed as dist
    from safetensors.torch import load_file

    from fastvideo.distributed.parallel_state import get_sp_group, get_world_rank

    cuda = torch.cuda.is_available() and dist.get_backend() == "nccl"
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    dtype = getattr(torch, dtype_name)
    vae = build_ours(config, load_file(weights_path, device=device), device, dtype)
    if tile is not None:
        vae.enable_tiling(*tile)
    z = z.to(device, dtype)
    group = get_sp_group()
    with torch.inference_mode():
        for _ in range(warmup):
            vae.decode(z)
        _sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        video = None
        for _ in range(repeats):
            video = None
            dist.barrier(group=group)
            started = time.perf_counter()
            video = vae.decode(z)
            _sync(device)
            dist.barrier(group=group)
            times.append(time.perf_counter() - started)
    if get_world_rank() == 0:
        torch.save(video.float().cpu(), video_path)
    return {
        "time_s": statistics.median(times),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
    }


def run_split(
    ns: argparse.Namespace,
    reference,
    z: torch.Tensor,
    tile: tuple[int, int, int, int] | None,
    dtype: torch.dtype,
) -> tuple[dict[str, Any], torch.Tensor]:
    from safetensors.torch import save_file

    from fastvideo.testing.distributed import run_on_ranks

    backend = "nccl" if torch.device(ns.device).type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory(prefix="bench-vae-") as tmp:
        weights = str(Path(tmp) / "vae.safetensors")
        state = {k: v.detach().cpu().contiguous() for k, v in reference.state_dict().items()}
        save_file(state, weights)
        video_path = str(Path(tmp) / "video.pt")
        per_rank = run_on_ranks(
            _split_rank,
            world_size=ns.gpus,
            args=(
                dict(reference.config),
                weights,
                z.cpu(),
                tile,
                str(dtype).removeprefix("torch."),
                ns.repeats,
                ns.warmup,
                video_path,
            ),
            sp_size=ns.gpus,
            backend=backend,
        )
        video = torch.load(video_path)
    peaks = [r["peak_gib"] for r in per_rank if r["peak_gib"] is not None]
    return {
        "time_s": per_rank[0]["time_s"],
        "peak_gib": max(peaks) if peaks else None,
        "peak_gib_per_rank": peaks,
    }, video


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny_wan's VAE and latents (CPU)")
    parser.add_argument("--model-folder", default=None, help="read the VAE from DIR/vae")
    parser.add_argument("--latent", default=None, help="T,H,W of the latent (default 21,60,104)")
    parser.add_argument("--tile", default=None, help="enable_tiling args: h,w,stride_h,stride_w")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--gpus", type=int, default=1, help="also split over this many ranks")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-tf32", action="store_true", help="cuDNN convolutions in true fp32")
    parser.add_argument(
        "--chunk-frames", type=int, default=4, help="also ours with N latent frames per call"
    )
    parser.add_argument(
        "--channels-last", action="store_true", help="also ours with channels-last convolutions"
    )
    parser.add_argument("--profile", action="store_true", help="kernel time per plain row")
    parser.add_argument(
        "--fp32-reference", action="store_true", help="also diff every row vs TF32-off diffusers"
    )
    parser.add_argument("--json", default=None)
    ns = parser.parse_args()
    if ns.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    dtype = torch.float32 if ns.dtype == "fp32" else torch.bfloat16
    latent = tuple(int(v) for v in ns.latent.split(",")) if ns.latent else None
    latent = latent or ((3, 8, 12) if ns.tiny else (21, 60, 104))
    tile = tuple(int(v) for v in ns.tile.split(",")) if ns.tile else None
    tile = tile or (TINY_TILE if ns.tiny else (256, 256, 192, 192))

    reference = build_reference(ns, dtype)
    config = dict(reference.config)
    ours = build_ours(config, reference.state_dict(), ns.device, dtype)
    z_dim = config["z_dim"]
    gen = torch.Generator("cpu").manual_seed(0)
    z = torch.randn(1, z_dim, *latent, generator=gen).to(ns.device, dtype)

    cuda = torch.device(ns.device).type == "cuda"
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(ns.device) if cuda else "cpu",
        "torch": torch.__version__,
        "dtype": ns.dtype,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32 if cuda else None,
        "latent": [z_dim, *latent],
        "tile": list(tile),
        "rows": {},
    }

    def diffusers_decode():
        return reference.decode(z, return_dict=False)[0]

    def ours_decode():
        return ours.decode(z)

    rows = results["rows"]
    outputs: dict[str, torch.Tensor] = {}
    plan = [
        ("diffusers plain", reference, diffusers_decode),
        ("diffusers tiled", reference, diffusers_decode),
        ("ours plain", ours, ours_decode),
        ("ours tiled", ours, ours_decode),
    ]
    chunk = ns.chunk_frames
    if chunk > 1:
        plan.append((f"ours plain, {chunk}-latent-frame chunks", ours, ours_decode))
    if ns.channels_last:
        plan.append(("ours plain, channels-last", ours, ours_decode))
        if chunk > 1:
            plan.append(
                (f"ours plain, channels-last, {chunk}-latent-frame chunks", ours, ours_decode)
            )
    for label, model, fn in plan:
        if label.endswith("tiled"):
            model.enable_tiling(*tile)
        else:
            model.disable_tiling()
        if model is ours:
            ours.set_decode_chunk_frames(chunk if "chunks" in label else 1)
            ours.use_channels_last("channels-last" in label)
        seconds, peak, outputs[label] = time_decode(fn, ns.device, ns.repeats, ns.warmup)
        rows[label] = {"time_s": seconds, "peak_gib": peak}
        if ns.profile and cuda and "tiled" not in label:
            rows[label]["kernels"] = kernel_profile(fn)
        print(json.dumps({label: rows[label]}), flush=True)
        if ns.json:  # partial results survive a run cut short
            Path(ns.json).write_text(json.dumps(results, indent=2))
    if ns.gpus > 1:
        label = f"ours split over {ns.gpus} ranks"
        del ours
        if cuda:
            torch.cuda.empty_cache()
        rows[label], outputs[label] = run_split(ns, reference, z, tile, dtype)
        print(json.dumps({label: rows[label]}), flush=True)

    if ns.fp32_reference and cuda:
        # What every row should approximate: diffusers' decode without TF32. Against it,
        # TF32 rows' differences are their own rounding, not a disagreement with diffusers.
        torch.backends.cudnn.allow_tf32 = False
        reference.disable_tiling()
        with torch.inference_mode():
            exact = diffusers_decode().float().cpu()
        torch.backends.cudnn.allow_tf32 = True
        for label, video in outputs.items():
            rows[label]["max_abs_diff_vs_fp32_no_tf32"] = (video - exact).abs().max().item()
    reference_video = outputs["diffusers plain"]
    results["video"] = list(reference_video.shape[2:])
    for label, video in outputs.items():
        diff = (video - reference_video).abs().max().item()
        rows[label]["max_abs_diff_vs_diffusers_plain"] = diff
        if label != "diffusers plain" and "plain" not in label:
            tiled = outputs["diffusers tiled"]
            rows[label]["max_abs_diff_vs_diffusers_tiled"] = (video - tiled).abs().max().item()
    base = rows["diffusers plain"]
    print(json.dumps(results, indent=2))
    header = (
        f"{results['gpu']}, torch {results['torch']}, {results['date']}: Wan2.1 VAE decode, "
        f"{ns.dtype} (cuDNN TF32 {'on' if results['cudnn_allow_tf32'] else 'off'}), latent "
        f"{results['latent']} -> {results['video'][0]} frames at {results['video'][1]}x"
        f"{results['video'][2]}, tiles {tile[0]}x{tile[1]} px every {tile[2]}x{tile[3]} px, "
        f"median of {ns.repeats} after {ns.warmup} warm-up"
    )
    print("\n" + header)
    print(
        "| decode | s | speed-up vs diffusers plain | peak GiB | max abs diff vs diffusers "
        "plain | max abs diff vs diffusers tiled |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for label, row in rows.items():
        peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        vs_tiled = row.get("max_abs_diff_vs_diffusers_tiled")
        print(
            f"| {label} | {row['time_s']:.3f} | {base['time_s'] / row['time_s']:.2f}x | {peak} | "
            f"{row['max_abs_diff_vs_diffusers_plain']:.2e} | "
            f"{'-' if vs_tiled is None else f'{vs_tiled:.2e}'} |"
        )
    if ns.json:
        Path(ns.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
