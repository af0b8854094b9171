"""End-to-end text-to-video time on 1, 2, 4... GPUs through the long-lived rank executor.

For each model size and GPU count, ``VideoGenerator.from_pretrained(folder, num_gpus=N,
sp_size=..., cfg_parallel=..., tp_size=...)`` starts N rank processes (N = 1: the pipeline
runs in this process), a warm-up request runs, then one measured request: prompt encoding,
every denoising step, VAE decode (split over the ranks), frames back to this process, mp4.
Random-weight Wan2.1 folders (``bench.random_wan``): the 1.3B shape at 81x480x832
and the 14B shape at 81x720x1280, guidance 5.0 (two DiT forwards a step), DiT and UMT5 in
bf16, VAE in fp32.

    python -m bench.e2e_scaling --sizes 1.3b,14b --gpus 1,2,4 [--steps 1.3b=50,14b=50]
    python -m bench.e2e_scaling --device cpu --size tiny --gpus 1,2 --steps 2   # CPU smoke

Figures (wall seconds):
- total: the ``generate_video`` call as the caller sees it, plus the mp4 write.
- stages: rank 0's ``stage_timings`` grouped as in ``bench/e2e.py`` (text_encode includes the
  set-up stages, which are the first to wait for the encoder's queued GPU work; nothing is
  added to the ranks to synchronise stage ends, so a stage's last kernels can be billed to the
  next one, and the decode's tail to "other"). other = total - stages: frames from rank 0 to
  this process (pickled over a socket: about 0.9 GB at 720p), postprocessing.
- s / step: the DiT time per denoising step (both guidance branches, the scheduler, the
  per-step stop broadcast and progress message), median of steps 2..N from rank 0's progress
  reports; step 1 is reported on its own (it may carry one-off costs of a new shape).
- speed-up and efficiency: against the 1-GPU row of the same size, for the total and for
  s / step.
- peak GiB / GPU: NVML memory in use on each GPU of the run (CUDA contexts and the caching
  allocator's reserve included), sampled every 50 ms, minus what was in use before loading;
  the largest over the GPUs. N = 1 also reports ``torch.cuda.max_memory_allocated``.

Honest totals: with ``--steps`` below ``--report-steps`` (default 50) the tables show what
was measured at that step count; a separate table, labelled EXTRAPOLATED, estimates the
50-step total as measured total - measured denoise + first step + 49 x median step. The
per-step DiT time is measured either way. Run ``--steps 50`` when the time allows.

``--budget-s``: start no new configuration after this many seconds (the rest are reported as
skipped), so a time-limited job still prints its tables; results are also written to
``--json`` after every configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from bench.e2e import (
    NEGATIVE_PROMPT,
    PROMPT,
    environment,
    extrapolate,
    fmt,
    group_ours_stages,
    model_folder,
    quiet_libraries,
    request_shape,
    step_times,
    summarize_steps,
    warmup_request,
)


class GpuMemorySampler:
    """Peak NVML memory in use on some GPUs while it runs, above what was in use at start."""

    def __init__(self, visible_indices: list[int], interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self._handles: list[Any] = []
        self._baseline: list[int] = []
        self._peak: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            physical = _physical_gpu_indices(visible_indices)
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in physical]
        except Exception as err:  # no NVML: report no peak rather than fail the benchmark
            print(f"NVML unavailable ({type(err).__name__}: {err}); no per-GPU peak memory")
            self._handles = []

    @property
    def available(self) -> bool:
        return bool(self._handles)

    def _used(self) -> list[int]:
        return [self._nvml.nvmlDeviceGetMemoryInfo(h).used for h in self._handles]

    def start(self) -> None:
        if not self.available:
            return
        self._baseline = self._used()
        self._peak = list(self._baseline)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True, name="nvml-sampler")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self._peak = [max(p, u) for p, u in zip(self._peak, self._used(), strict=True)]
            self._stop.wait(self.interval_s)

    def stop(self) -> list[float] | None:
        """Peak GiB above the baseline, per GPU."""
        if not self.available or self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        return [(p - b) / 2**30 for p, b in zip(self._peak, self._baseline, strict=True)]


def _physical_gpu_indices(visible: list[int]) -> list[int]:
    mapping = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mapping:
        entries = [e.strip() for e in mapping.split(",") if e.strip()]
        if all(e.isdigit() for e in entries):
            return [int(entries[i]) for i in visible]
    return list(visible)


def layouts(gpus: list[int], cfg: bool) -> list[tuple[int, int, int]]:
    """(num_gpus, sp_size, cfg degree) for every GPU count (and its CFG split with --cfg)."""
    out = []
    for n in gpus:
        out.append((n, n, 1))
        if cfg and n % 2 == 0:
            out.append((n, n // 2, 2))
    return out


def parse_steps(text: str, sizes: list[str]) -> dict[str, int]:
    """Step counts per size from "50" (every size) or "1.3b=50,14b=10"."""
    if "=" not in text:
        return dict.fromkeys(sizes, int(text))
    steps = {}
    for item in text.split(","):
        size, value = item.split("=")
        steps[size.strip()] = int(value)
    missing = [s for s in sizes if s not in steps]
    if missing:
        raise SystemExit(f"--steps names no step count for {missing}")
    return steps


def run_config(
    folder: Path,
    request: dict[str, Any],
    gpus: int,
    sp: int,
    cfg: int,
    tp: int,
    ns: argparse.Namespace,
    out_dir: Path,
) -> dict[str, Any]:
    from fastvideo import VideoGenerator

    cuda = torch.device(ns.device).type == "cuda"
    sampler = GpuMemorySampler(list(range(gpus))) if cuda else None
    if sampler is not None:
        sampler.start()
    result: dict[str, Any] = {"gpus": gpus, "sp": sp, "cfg": cfg, "tp": tp}
    started = time.perf_counter()
    try:
        generator = VideoGenerator.from_pretrained(
            folder,
            device=ns.device,
            num_gpus=gpus,
            sp_size=sp,
            cfg_parallel=cfg == 2,
            tp_size=tp,
            **ns.engine_args,
        )
    except BaseException:
        if sampler is not None:
            sampler.stop()
        raise
    try:
        result["load_s"] = time.perf_counter() - started
        warm = warmup_request(request, ns.warmup)
        if warm is not None:
            started = time.perf_counter()
            generator.generate_video(**warm, return_frames=False)
            result["warmup_s"] = time.perf_counter() - started
        if cuda and gpus == 1:
            torch.cuda.reset_peak_memory_stats()
        elapsed: list[float] = []
        started = time.perf_counter()
        out = generator.generate_video(
            **request,
            output_path=None if ns.no_mp4 else out_dir / f"{gpus}gpu-sp{sp}-cfg{cfg}.mp4",
            return_frames=False,
            callback=lambda progress: elapsed.append(progress.elapsed_s),
        )
        total = time.perf_counter() - started
        if cuda and gpus == 1:
            result["torch_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    finally:
        generator.close()
        per_gpu = sampler.stop() if sampler is not None else None
        del generator
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    result.update(
        total_s=total,
        stages=group_ours_stages(out.stage_timings, total),
        raw_stages=dict(out.stage_timings),
        peak_gib=max(per_gpu) if per_gpu else None,
        peak_gib_per_gpu=[round(p, 2) for p in per_gpu] if per_gpu else None,
        **summarize_steps(step_times(elapsed)),
    )
    return result


def tables(results: dict[str, Any]) -> str:
    lines = []
    for size, entry in results["sizes"].items():
        rows = [r for r in entry["rows"] if r.get("status") == "ok"]
        video = entry["video"]
        lines.append("")
        lines.append(
            f"{results['gpu']}, torch {results['torch']}, {results['date']}: Wan2.1-{size} shape, "
            f"{video[0]} frames at {video[1]}x{video[2]}, {entry['steps']} steps measured, "
            f"guidance {results['guidance_scale']}, DiT + UMT5 bf16, VAE fp32"
            if results["gpu"] != "cpu"
            else f"CPU smoke run ({size}), {entry['steps']} steps: timings are not meaningful"
        )
        lines.append(
            "| GPUs | SP | CFG | TP | load s | text encode s | denoise s | s / step | "
            "VAE decode s | mp4 s | other s | total s | speed-up | efficiency | "
            "step speed-up | peak GiB / GPU |"
        )
        lines.append("| " + " | ".join(["---"] * 16) + " |")
        base = next((r for r in rows if r["gpus"] == 1), None)
        for r in rows:
            st = r["stages"]
            speedup = base["total_s"] / r["total_s"] if base else None
            step_speedup = (
                base["step_s_median"] / r["step_s_median"]
                if base and base.get("step_s_median") and r.get("step_s_median")
                else None
            )
            speedup_text = "-" if speedup is None else f"{speedup:.2f}x"
            efficiency = "-" if speedup is None else f"{speedup / r['gpus']:.0%}"
            step_text = "-" if step_speedup is None else f"{step_speedup:.2f}x"
            lines.append(
                f"| {r['gpus']} | {r['sp']} | {r['cfg']} | {r['tp']} | {fmt(r['load_s'], 1)} | "
                f"{fmt(st['text_encode'])} | {fmt(st['denoise'])} | "
                f"{fmt(r['step_s_median'], 3)} | {fmt(st['vae_decode'])} | "
                f"{fmt(st['mp4_encode'])} | {fmt(st['other'])} | {fmt(r['total_s'])} | "
                f"{speedup_text} | {efficiency} | {step_text} | {fmt(r['peak_gib'], 1)} |"
            )
        for r in entry["rows"]:
            if r.get("status") != "ok":
                lines.append(f"(GPUs {r['gpus']}, SP {r['sp']}, CFG {r['cfg']}: {r.get('status')})")
        extrapolated = [r for r in rows if r.get("extrapolated_total_s") is not None]
        if extrapolated:
            report = results["report_steps"]
            lines.append("")
            lines.append(
                f"EXTRAPOLATED to {report} steps, not measured (measured total - measured "
                f"denoise + first step + {report - 1} x median step):"
            )
            lines.append("| GPUs | SP | CFG | total s (extrapolated) | speed-up (extrapolated) |")
            lines.append("| --- | --- | --- | --- | --- |")
            base_x = next((r for r in extrapolated if r["gpus"] == 1), None)
            for r in extrapolated:
                speedup = (
                    base_x["extrapolated_total_s"] / r["extrapolated_total_s"] if base_x else None
                )
                speedup_text = "-" if speedup is None else f"{speedup:.2f}x"
                lines.append(
                    f"| {r['gpus']} | {r['sp']} | {r['cfg']} | "
                    f"{r['extrapolated_total_s']:.1f} | {speedup_text} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", "--size", dest="sizes", default="1.3b,14b", help="comma list: tiny,1.3b,14b"
    )
    parser.add_argument("--gpus", default="1,2,4", help="GPU counts, comma list")
    parser.add_argument("--cfg", action="store_true", help="also SP x CFG-parallel=2 layouts")
    parser.add_argument(
        "--tp", choices=("1", "all"), default="1", help="text-encoder TP: 1, or all the GPUs"
    )
    parser.add_argument("--steps", default="50", help='"50", or per size "1.3b=50,14b=10"')
    parser.add_argument("--report-steps", type=int, default=50, help="extrapolation target")
    parser.add_argument("--warmup", choices=("small", "full", "none"), default="small")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model-folder", default=None, help="an existing folder (one size)")
    parser.add_argument("--build-dir", default=None, help="keep/reuse built folders here")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-mp4", action="store_true")
    parser.add_argument("--engine-args", type=json.loads, default={}, help="FastVideoArgs JSON")
    parser.add_argument("--budget-s", type=float, default=None, help="start nothing after this")
    parser.add_argument("--json", default=None)
    ns = parser.parse_args()
    script_started = time.perf_counter()
    quiet_libraries()
    sizes = [s.strip() for s in ns.sizes.split(",") if s.strip()]
    if ns.model_folder and len(sizes) != 1:
        raise SystemExit("--model-folder needs exactly one --sizes entry")
    gpu_counts = [int(n) for n in ns.gpus.split(",")]
    steps = parse_steps(ns.steps, sizes)
    cuda = torch.device(ns.device).type == "cuda"
    if cuda and torch.cuda.device_count() < max(gpu_counts):
        raise SystemExit(
            f"--gpus {ns.gpus} needs {max(gpu_counts)} GPUs; {torch.cuda.device_count()} visible"
        )
    results: dict[str, Any] = {
        **environment(ns.device),
        "guidance_scale": ns.guidance_scale,
        "report_steps": ns.report_steps,
        "warmup": ns.warmup,
        "tp": ns.tp,
        "engine_args": ns.engine_args,
        "sizes": {},
    }

    def save() -> None:
        if ns.json:
            Path(ns.json).write_text(json.dumps(results, indent=2))

    with tempfile.TemporaryDirectory(prefix="bench-e2e-scaling-") as tmp:
        for size in sizes:
            frames, height, width = request_shape(ns, size)
            request = dict(
                prompt=PROMPT,
                negative_prompt=NEGATIVE_PROMPT,
                height=height,
                width=width,
                num_frames=frames,
                num_inference_steps=steps[size],
                guidance_scale=ns.guidance_scale,
                seed=ns.seed,
                fps=16,
            )
            entry: dict[str, Any] = {"video": [frames, height, width], "steps": steps[size]}
            entry["rows"] = rows = []
            results["sizes"][size] = entry
            folder = None
            for gpus, sp, cfg in layouts(gpu_counts, ns.cfg):
                spent = time.perf_counter() - script_started
                if ns.budget_s is not None and spent > ns.budget_s:
                    status = f"skipped: {spent:.0f}s spent of --budget-s {ns.budget_s:.0f}"
                    rows.append({"gpus": gpus, "sp": sp, "cfg": cfg, "status": status})
                    print(json.dumps({size: rows[-1]}), flush=True)
                    continue
                if folder is None:
                    folder = model_folder(ns, size)
                    entry["model_folder"] = str(folder)
                tp = gpus if ns.tp == "all" else 1
                try:
                    row = run_config(folder, request, gpus, sp, cfg, tp, ns, Path(tmp))
                    row["status"] = "ok"
                    row["extrapolated_total_s"] = extrapolate(row, steps[size], ns.report_steps)
                except Exception as err:
                    traceback.print_exc()
                    row = {"gpus": gpus, "sp": sp, "cfg": cfg, "tp": tp}
                    row["status"] = f"error: {type(err).__name__}: {str(err)[:300]}"
                rows.append(row)
                print(json.dumps({size: row}), flush=True)
                save()
    results["wall_s"] = time.perf_counter() - script_started
    save()
    print(json.dumps(results, indent=2))
    print(tables(results))


if __name__ == "__main__":
    main()
