"""The GPU benchmarks' CPU smoke modes run end to end, and random_wan writes loadable folders.

Each ``bench/`` script runs as a subprocess, as on the device (``python -m bench.<name>``), on
tiny_wan-sized models: it must exit 0 and print its JSON and markdown table with the keys the
results pages are built from. No timing is asserted: CPU timings mean nothing here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(300)


def _run(module: str, *args: str, tmp_path: Path) -> tuple[str, dict]:
    out_json = tmp_path / f"{module}.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args, "--json", str(out_json)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"bench.{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr}"
    return proc.stdout, json.loads(out_json.read_text())


def test_e2e_cpu_smoke(tmp_path):
    stdout, results = _run(
        "e2e", "--device", "cpu", "--size", "tiny", "--steps", "2", tmp_path=tmp_path
    )
    assert "| system | load s | text encode s | denoise s | s / step |" in stdout
    assert "| ours |" in stdout and "| diffusers |" in stdout
    assert "EXTRAPOLATED, not measured" in stdout  # 2 steps measured, 50 reported
    assert results["video"] == [9, 64, 96] and results["steps"] == 2
    for name in ("ours", "diffusers"):
        system = results["systems"][name]
        assert set(system["stages"]) == {
            "text_encode",
            "denoise",
            "vae_decode",
            "mp4_encode",
            "other",
        }
        for key in ("load_s", "total_s", "first_step_s", "step_s_median", "peak_gib"):
            assert key in system
        assert len(system["step_s"]) == 2
        assert system["stages"]["mp4_encode"] > 0
        assert system["extrapolated_total_s"] is not None
    assert "denoising_stage" in results["systems"]["ours"]["raw_stages"]
    # Same folder, same seed, fp32 on the CPU: the two pipelines agree.
    assert results["max_abs_diff_frames"] <= 1e-4


def test_vae_cpu_smoke(tmp_path):
    stdout, results = _run(
        "vae",
        "--device",
        "cpu",
        "--tiny",
        "--gpus",
        "2",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--channels-last",
        "--chunk-frames",
        "2",
        tmp_path=tmp_path,
    )
    assert "| decode | s | speed-up vs diffusers plain | peak GiB |" in stdout
    rows = results["rows"]
    variants = (
        "ours plain, 2-latent-frame chunks",
        "ours plain, channels-last",
        "ours plain, channels-last, 2-latent-frame chunks",
    )
    assert set(rows) == {
        "diffusers plain",
        "diffusers tiled",
        "ours plain",
        "ours tiled",
        *variants,
        "ours split over 2 ranks",
    }
    for label in variants:  # exact: the same math in other kernels
        assert rows[label]["max_abs_diff_vs_diffusers_plain"] <= 1e-5
    assert results["video"] == [9, 64, 96]
    for row in rows.values():
        assert {"time_s", "peak_gib", "max_abs_diff_vs_diffusers_plain"} <= set(row)
    assert rows["ours plain"]["max_abs_diff_vs_diffusers_plain"] <= 1e-5
    assert rows["ours tiled"]["max_abs_diff_vs_diffusers_tiled"] <= 1e-5
    assert rows["ours split over 2 ranks"]["max_abs_diff_vs_diffusers_tiled"] <= 1e-5


def test_e2e_scaling_cpu_smoke(tmp_path):
    stdout, results = _run(
        "e2e_scaling",
        "--device",
        "cpu",
        "--size",
        "tiny",
        "--gpus",
        "1,2",
        "--steps",
        "2",
        tmp_path=tmp_path,
    )
    assert "| GPUs | SP | CFG | TP | load s |" in stdout
    assert "EXTRAPOLATED to 50 steps, not measured" in stdout
    rows = results["sizes"]["tiny"]["rows"]
    assert [(r["gpus"], r["sp"], r["cfg"], r["status"]) for r in rows] == [
        (1, 1, 1, "ok"),
        (2, 2, 1, "ok"),
    ]
    for row in rows:
        for key in ("load_s", "total_s", "stages", "step_s_median", "first_step_s", "peak_gib"):
            assert key in row
        assert len(row["step_s"]) == 2


def test_random_wan_real_configs_have_the_released_sizes():
    from bench.random_wan import build_random_wan_components

    def params(module) -> int:
        return sum(p.numel() for p in module.parameters())

    small = build_random_wan_components("1.3b")
    big = build_random_wan_components("14b", image_to_video=True)
    assert small["transformer"].device.type == "meta"  # shapes only, nothing allocated
    assert 1.40e9 < params(small["transformer"]) < 1.45e9
    assert 14.2e9 < params(big["transformer"]) < 16.5e9
    assert big["transformer"].config.in_channels == 36
    encoder = small["text_encoder"].config
    assert (encoder.vocab_size, encoder.d_model, encoder.num_layers) == (256384, 4096, 24)
    assert (encoder.num_heads, encoder.d_kv, encoder.d_ff) == (64, 64, 10240)
    assert len(small["tokenizer"]) < encoder.vocab_size
    assert small["vae"].config.base_dim == 96 and small["vae"].config.z_dim == 16


def test_random_wan_tiny_sharded_and_linked_folders_load(tmp_path):
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
    from safetensors import safe_open

    from bench.random_wan import MARKER, save_random_wan
    from fastvideo import VideoGenerator

    first = save_random_wan(tmp_path / "a", size="tiny", device="cpu", max_shard_size="20KB")
    index = json.loads(
        (first / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text()
    )
    shard_names = sorted(set(index["weight_map"].values()))
    assert len(shard_names) > 1
    with safe_open(str(first / "transformer" / shard_names[0]), framework="pt") as f:
        name = next(iter(f.keys()))
        assert f.get_tensor(name).dtype == torch.bfloat16
    reference = WanTransformer3DModel.from_pretrained(first, subfolder="transformer")
    assert torch.isfinite(next(reference.parameters())).all()
    assert (first / MARKER).is_file()

    second = save_random_wan(
        tmp_path / "b", size="tiny", device="cpu", text_encoder_from=first / "text_encoder"
    )
    assert (second / "text_encoder").is_symlink()
    generator = VideoGenerator.from_pretrained(second, device="cpu")
    frames = generator.generate_video(
        "a cat", height=32, width=32, num_frames=5, num_inference_steps=1, seed=0
    ).frames
    assert frames.shape == (5, 32, 32, 3) and np_isfinite(frames)

    i2v = save_random_wan(tmp_path / "i2v", size="tiny", image_to_video=True, device="cpu")
    pipe = WanImageToVideoPipeline.from_pretrained(i2v)
    assert pipe.image_encoder is not None and pipe.transformer.config.image_dim is not None


def np_isfinite(array) -> bool:
    import numpy as np

    return bool(np.isfinite(array).all())


def test_dit_step_cpu_smoke(tmp_path):
    stdout, results = _run(
        "dit_step",
        *("--device", "cpu", "--shape", "tiny", "--ablation", "--sta", "1,1,1"),
        *("--repeats", "1", "--step-repeats", "1", "--warmup", "0"),
        tmp_path=tmp_path,
    )
    assert "| system | s / forward | s / CFG step | peak GiB |" in stdout
    for label in (
        "diffusers eager",
        "ours eager",
        "ours eager, fused kernels off",
        "ours STA 1,1,1",
    ):
        assert f"| {label} |" in stdout
        assert results[f"{label}_forward_s"] > 0 and results[f"{label}_cfg_step_s"] > 0
    # A 1x1x1-tile window at this grid (3x4x6 tokens, one 6x8x8 tile) is the whole sequence.
    assert results["sta_block_sparsity"] == 0.0
    assert results["sta_max_abs_diff_vs_dense"] < 0.05  # bf16 on CPU, two attention kernels


def test_quality_cpu_smoke(tmp_path):
    stdout, results = _run(
        "quality",
        *("--device", "cpu", "--size", "tiny", "--steps", "3", "--prompts", "2"),
        *("--configs", "dense,sta:1.1.1,cache:0.5"),
        tmp_path=tmp_path,
    )
    assert "| configuration | denoise s | s / step | speed-up | PSNR dB | SSIM |" in stdout
    configs = results["configs"]
    assert list(configs) == ["dense", "sta:1.1.1", "cache:0.5"]
    assert configs["dense"]["psnr_db"] == float("inf") and configs["dense"]["ssim"] == 1.0
    # A window covering the whole (tiny) grid is dense attention up to rounding.
    assert configs["sta:1.1.1"]["psnr_db"] > 60
    cache = configs["cache:0.5"]
    assert cache["forwards_skipped"] > 0 and cache["psnr_db"] < configs["sta:1.1.1"]["psnr_db"]


def test_psnr_and_ssim_of_known_inputs():
    import numpy as np

    from bench.quality import psnr, ssim

    rng = np.random.default_rng(0)
    frames = rng.random((2, 32, 40, 3)).astype(np.float32)
    assert psnr(frames, frames) == float("inf") and abs(ssim(frames, frames) - 1.0) < 1e-12
    shifted = np.clip(frames + 0.1, 0, 1)
    mse = float(np.mean((shifted.astype(np.float64) - frames) ** 2))
    assert abs(psnr(shifted, frames) - 10 * np.log10(1 / mse)) < 1e-9
    noisy = np.clip(frames + rng.normal(0, 0.2, frames.shape), 0, 1).astype(np.float32)
    assert 0 < ssim(noisy, frames) < ssim(shifted, frames) < 1


def test_control_plane_smoke_releases_every_job_once_within_the_bound(tmp_path):
    _stdout, results = _run("control_plane", "--smoke", "--per-worker", "8", tmp_path=tmp_path)
    assert results["submit"]["lines"] == 300 and results["submit"]["lines_per_s"] > 0
    release = results["release"]
    assert release["released"] == release["release_events"] == release["taken"] == 300
    assert 0 < release["queue_peak"] <= release["bound"] == 8
    assert set(results["with_backlog"]) == {"reaper_pass_s", "choose_64_s", "chosen"}


def test_bulk_dataset_smoke_submits_resumes_and_exports_every_item(tmp_path):
    stdout, results = _run("bulk_dataset", "--smoke", tmp_path=tmp_path)
    assert results["items"] == 200 and results["submit"]["items_per_s"] > 0
    assert results["export"]["parquet_mib"] > 0 and results["export"]["jsonl_mib"] > 0
    assert results["get_batch"]["median_ms"] > 0 and results["items_page"]["bytes"] > 0
    assert "| sqlite | 200 |" in stdout


def test_console_scale_smoke_times_every_endpoint(tmp_path):
    stdout, results = _run("console_scale", "--smoke", tmp_path=tmp_path)
    assert results["rows"] == 5000 and results["batch_items"] == 500
    assert results["endpoints"] and all("median_ms" in e for e in results["endpoints"].values())
    assert "| operator /metrics |" in stdout
