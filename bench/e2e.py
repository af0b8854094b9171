"""End-to-end text-to-video: ours (``VideoGenerator``) vs ``diffusers.WanPipeline``, same
model folder, same seed, same GPU, same process, one after the other.

Default: a random-weight Wan2.1-T2V-1.3B folder (``bench.random_wan``; speed does
not depend on the values), 81 frames at 480x832, 50 steps, guidance 5.0 (two DiT forwards a
step). Both load the DiT and UMT5 in bf16 and the VAE in fp32, as the model card does.

    python -m bench.e2e [--build 1.3b | --model-folder DIR] [--steps 50] [--json out.json]
    python -m bench.e2e --device cpu --size tiny --steps 2          # CPU smoke test

Per system: a warm-up request (``--warmup small``: 5 frames at <=128x128, 1 step, which
initialises kernels, cuBLAS/cuDNN handles and the allocator; ``full``: the measured shape at
1 step; ``none``), then one measured request (``--repeats`` for more; the median total is
kept). Stages, in wall seconds, each ending on a device synchronisation:

- ours: ``GenerationResult.stage_timings``. Here, in one process, every stage of the loaded
  pipeline is wrapped to synchronise the device when it ends, so no stage's queued GPU work is
  billed to the next. text_encode = input validation + prompt encoding + timestep and latent
  set-up (the set-up is milliseconds); denoise = the denoising stage; vae_decode = the decoding
  stage (latent denormalisation, VAE, conversion to [0, 1]); mp4_encode = writing the file.
- diffusers: ``pipe.encode_prompt`` and ``pipe.vae.decode`` are wrapped with synchronising
  timers (instance attributes, so ``WanPipeline.__call__`` runs unchanged), and a
  ``callback_on_step_end`` synchronises and stamps every step. text_encode = encode_prompt;
  denoise = from encode_prompt's return to the last step's end (timesteps, initial noise and
  the loop); vae_decode = vae.decode; mp4_encode = ``diffusers.utils.export_to_video`` when its
  imageio-ffmpeg backend is installed, else our ``write_mp4`` (the JSON says which).
- other = total - the stages: input checks, frames to the host, postprocessing.
- s / step: median of denoising steps 2..N (step 1 is reported as ``first_step_s``), from a
  step callback on each side that synchronises the device and stamps the clock (one sync a
  step, microseconds against a step of about a second).
- peak GiB: ``torch.cuda.max_memory_allocated`` over the measured request, weights included
  (``weights_gib``: allocated right after loading).

With ``--steps`` below ``--report-steps`` (50) the measured run is what the table shows; an
extra, labelled line extrapolates each total to 50 steps (measured total - measured denoise +
first step + 49 x median step). Measure 50 steps when the time allows.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import functools
import gc
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = (
    "A cat and a dog baking a cake together in a sunlit kitchen, flour in the air, "
    "cinematic lighting, shallow depth of field"
)
NEGATIVE_PROMPT = "blurry, low quality, static, distorted, watermark, text"
STAGES = ("text_encode", "denoise", "vae_decode", "mp4_encode", "other")
#: Our pipeline stages -> the reported stages (anything else lands in "other").
OURS_STAGE_GROUPS = {
    "input_validation_stage": "text_encode",
    "prompt_encoding_stage": "text_encode",
    "image_encoding_stage": "text_encode",
    "timestep_preparation_stage": "text_encode",
    "latent_preparation_stage": "text_encode",
    "denoising_stage": "denoise",
    "decoding_stage": "vae_decode",
    "mp4_encode": "mp4_encode",
}


# -- shared with bench/e2e_scaling.py ---------------------------------------------------------


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: str) -> dict[str, Any]:
    import diffusers

    info: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": device,
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpus_visible"] = torch.cuda.device_count()
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    else:
        info["gpu"] = "cpu"
    return info


def model_folder(ns: argparse.Namespace, size: str) -> Path:
    """``--model-folder``, or a random-weight folder of ``size`` under ``--build-dir``
    (reused when already complete), or under a temporary directory."""
    if ns.model_folder:
        return Path(ns.model_folder)
    from bench.random_wan import cached_random_wan

    root = ns.build_dir
    if root is None:
        root = tempfile.mkdtemp(prefix="random-wan-")
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        ns.build_dir = root
    started = time.perf_counter()
    folder = cached_random_wan(root, size)
    print(f"model folder {folder} ready in {time.perf_counter() - started:.1f}s", flush=True)
    return folder


def request_shape(ns: argparse.Namespace, size: str) -> tuple[int, int, int]:
    from bench.random_wan import VIDEO_SHAPES

    frames, height, width = VIDEO_SHAPES[size]
    return ns.frames or frames, ns.height or height, ns.width or width


def warmup_request(request: dict[str, Any], mode: str) -> dict[str, Any] | None:
    if mode == "none":
        return None
    warm = {**request, "num_inference_steps": 1}
    if mode == "small":
        warm.update(
            num_frames=min(5, request["num_frames"]),
            height=min(128, request["height"]),
            width=min(128, request["width"]),
        )
    return warm


def step_times(elapsed: list[float]) -> list[float]:
    """Per-step durations from the cumulative seconds after each step."""
    return [b - a for a, b in zip([0.0, *elapsed[:-1]], elapsed, strict=True)]


def summarize_steps(durations: list[float]) -> dict[str, Any]:
    if not durations:
        return {"first_step_s": None, "step_s_median": None, "step_s": []}
    later = durations[1:] or durations
    return {
        "first_step_s": durations[0],
        "step_s_median": statistics.median(later),
        "step_s": [round(d, 4) for d in durations],
    }


def group_ours_stages(raw: dict[str, float], total: float) -> dict[str, float]:
    grouped = dict.fromkeys(STAGES, 0.0)
    for name, seconds in raw.items():
        grouped[OURS_STAGE_GROUPS.get(name, "other")] += seconds
    grouped["other"] += total - sum(raw.values())
    return grouped


def extrapolate(result: dict[str, Any], measured_steps: int, report_steps: int) -> float | None:
    """Total at ``report_steps`` steps from a run of ``measured_steps``: NOT a measurement."""
    if measured_steps == report_steps or result.get("first_step_s") is None:
        return None
    first, median = result["first_step_s"], result["step_s_median"]
    denoise_at_report = first + (report_steps - 1) * median
    return result["total_s"] - result["stages"]["denoise"] + denoise_at_report


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def peak_gib(device: str) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free_memory(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    with contextlib.suppress(Exception):
        import diffusers

        diffusers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.set_verbosity_error()
    with contextlib.suppress(Exception):
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()


# -- ours ---------------------------------------------------------------------------------------


def _synchronize_stages(pipeline: Any, device: str) -> None:
    """Make every stage end on a device synchronisation (instance attribute over ``forward``;
    ``PipelineStage.__call__`` times the call, so the sync lands inside the stage's time)."""
    for stage in pipeline.stages:
        original = stage.forward

        @functools.wraps(original)
        def forward(batch, args, _original=original):
            out = _original(batch, args)
            synchronize(device)
            return out

        stage.forward = forward


def run_ours(folder: Path, request: dict[str, Any], ns: argparse.Namespace, out_dir: Path):
    from fastvideo import VideoGenerator

    device = ns.device
    started = time.perf_counter()
    generator = VideoGenerator.from_pretrained(folder, device=device, **ns.engine_args)
    synchronize(device)
    result: dict[str, Any] = {"load_s": time.perf_counter() - started}
    result["weights_gib"] = (
        torch.cuda.memory_allocated(device) / 2**30 if device.startswith("cuda") else None
    )
    _synchronize_stages(generator.pipeline, device)
    try:
        warm = warmup_request(request, ns.warmup)
        if warm is not None:
            generator.generate_video(**warm, return_frames=False)
        runs = []
        for repeat in range(ns.repeats):
            durations: list[float] = []
            marks: list[float] = []

            def on_step(progress, _durations=durations, _marks=marks):
                # Step 1: the pipeline's own clock from the loop start (it reads the timestep
                # back, a sync); later steps: this synchronised clock, like diffusers' side.
                synchronize(device)
                _marks.append(time.perf_counter())
                step = progress.elapsed_s if len(_marks) == 1 else _marks[-1] - _marks[-2]
                _durations.append(step)

            synchronize(device)
            reset_peak(device)
            started = time.perf_counter()
            out = generator.generate_video(
                **request,
                output_path=None if ns.no_mp4 else out_dir / f"ours-{repeat}.mp4",
                callback=on_step,
            )
            total = time.perf_counter() - started
            runs.append((total, out, durations, peak_gib(device)))
        total, out, durations, peak = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
    finally:
        generator.close()
    result.update(
        total_s=total,
        totals_s=[run[0] for run in runs],
        stages=group_ours_stages(out.stage_timings, total),
        raw_stages=dict(out.stage_timings),
        peak_gib=peak,
        mp4_encoder=None if ns.no_mp4 else "fastvideo.utils.video_io.write_mp4",
        **summarize_steps(durations),
    )
    frames = out.frames
    del generator, out, runs
    free_memory(device)
    return result, frames


# -- diffusers ------------------------------------------------------------------------------------


def _timed(fn, device: str, record: list[tuple[float, float]]):
    """``fn`` with a device sync before and after; appends (start, end) to ``record``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        synchronize(device)
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        synchronize(device)
        record.append((start, time.perf_counter()))
        return value

    return wrapper


def _export_mp4(frames: np.ndarray, path: Path, fps: int) -> str:
    """diffusers' own ``export_to_video`` when its imageio-ffmpeg backend works, else ours."""
    try:
        from diffusers.utils import export_to_video

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_to_video(list(frames), str(path), fps=fps)
        return "diffusers.utils.export_to_video"
    except Exception:
        from fastvideo.utils.video_io import write_mp4

        write_mp4(frames, path, fps=fps)
        return "fastvideo.utils.video_io.write_mp4 (export_to_video unavailable)"


def run_diffusers(folder: Path, request: dict[str, Any], ns: argparse.Namespace, out_dir: Path):
    from diffusers import AutoencoderKLWan, WanPipeline

    device = ns.device
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    started = time.perf_counter()
    vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(folder, vae=vae, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    synchronize(device)
    result: dict[str, Any] = {"load_s": time.perf_counter() - started}
    result["weights_gib"] = (
        torch.cuda.memory_allocated(device) / 2**30 if device.startswith("cuda") else None
    )
    encode_times: list[tuple[float, float]] = []
    decode_times: list[tuple[float, float]] = []
    pipe.encode_prompt = _timed(pipe.encode_prompt, device, encode_times)
    pipe.vae.decode = _timed(pipe.vae.decode, device, decode_times)
    step_marks: list[float] = []

    def on_step_end(_pipe, _index, _timestep, _tensors):
        synchronize(device)
        step_marks.append(time.perf_counter())
        return {}

    def call(req: dict[str, Any], seed: int):
        return pipe(
            prompt=req["prompt"],
            negative_prompt=req["negative_prompt"],
            height=req["height"],
            width=req["width"],
            num_frames=req["num_frames"],
            num_inference_steps=req["num_inference_steps"],
            guidance_scale=req["guidance_scale"],
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
            callback_on_step_end=on_step_end,
        ).frames[0]

    warm = warmup_request(request, ns.warmup)
    if warm is not None:
        call(warm, request["seed"])
    runs = []
    for repeat in range(ns.repeats):
        encode_times.clear()
        decode_times.clear()
        step_marks.clear()
        synchronize(device)
        reset_peak(device)
        started = time.perf_counter()
        frames = call(request, request["seed"])
        synchronize(device)
        peak = peak_gib(device)
        encoder = None
        mp4 = 0.0
        if not ns.no_mp4:
            mp4_started = time.perf_counter()
            encoder = _export_mp4(frames, out_dir / f"diffusers-{repeat}.mp4", request["fps"])
            mp4 = time.perf_counter() - mp4_started
        total = time.perf_counter() - started
        (enc_start, enc_end), (dec_start, dec_end) = encode_times[0], decode_times[0]
        stages = {
            "text_encode": enc_end - enc_start,
            "denoise": step_marks[-1] - enc_end,
            "vae_decode": dec_end - dec_start,
            "mp4_encode": mp4,
        }
        stages["other"] = total - sum(stages.values())
        steps = summarize_steps(step_times([m - enc_end for m in step_marks]))
        runs.append((total, frames, stages, steps, peak, encoder))
    total, frames, stages, steps, peak, encoder = sorted(runs, key=lambda run: run[0])[
        len(runs) // 2
    ]
    result.update(
        total_s=total,
        totals_s=[run[0] for run in runs],
        stages=stages,
        peak_gib=peak,
        mp4_encoder=encoder,
        **steps,
    )
    pipe = vae = runs = None  # free the weights before the next system loads
    free_memory(device)
    return result, frames


# -- report ----------------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    systems = results["systems"]
    steps = results["steps"]
    lines = [
        f"{results['gpu']}, torch {results['torch']}, diffusers {results['diffusers']}, "
        f"{results['date']}: Wan2.1-{results['size']} shape, {results['video'][0]} frames at "
        f"{results['video'][1]}x{results['video'][2]}, {steps} steps, guidance "
        f"{results['guidance_scale']} (2 DiT forwards / step), DiT + text encoder bf16, VAE fp32"
        if results["gpu"] != "cpu"
        else f"CPU smoke run ({results['size']}), {steps} steps: timings are not meaningful",
        "",
        "| system | load s | text encode s | denoise s | s / step | VAE decode s | "
        "mp4 encode s | other s | total s | peak GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, res in systems.items():
        st = res["stages"]
        lines.append(
            f"| {name} | {fmt(res['load_s'], 1)} | {fmt(st['text_encode'])} | "
            f"{fmt(st['denoise'])} | {fmt(res['step_s_median'], 3)} | {fmt(st['vae_decode'])} | "
            f"{fmt(st['mp4_encode'])} | {fmt(st['other'])} | {fmt(res['total_s'])} | "
            f"{fmt(res['peak_gib'], 1)} |"
        )
    if "ours" in systems and "diffusers" in systems:
        ours, theirs = systems["ours"], systems["diffusers"]
        lines.append("")
        lines.append(
            f"ours vs diffusers: total {theirs['total_s'] / ours['total_s']:.2f}x, "
            f"denoise {theirs['stages']['denoise'] / ours['stages']['denoise']:.2f}x, "
            f"VAE decode {theirs['stages']['vae_decode'] / ours['stages']['vae_decode']:.2f}x "
            "(> 1: ours faster); frames max |ours - diffusers| = "
            f"{fmt(results.get('max_abs_diff_frames'), 4)}"
        )
    extrapolated = {
        name: res["extrapolated_total_s"]
        for name, res in systems.items()
        if res.get("extrapolated_total_s") is not None
    }
    if extrapolated:
        lines.append("")
        report = results["report_steps"]
        estimates = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in extrapolated.items())
        lines.append(
            f"EXTRAPOLATED, not measured: total at {report} steps = measured total - measured "
            f"denoise + first step + {report - 1} x median step: {estimates}"
        )
    return "\n".join(lines)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description or __doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model-folder", default=None, help="an existing diffusers Wan folder")
    parser.add_argument(
        "--size",
        "--build",
        dest="size",
        default="1.3b",
        choices=("tiny", "1.3b", "14b"),
        help="random-weight model to build (random_wan) when no --model-folder; also sets the "
        "default video shape (tiny 9x64x96, 1.3b 81x480x832, 14b 81x720x1280)",
    )
    parser.add_argument(
        "--build-dir", default=None, help="keep/reuse built folders here (default: a temp dir)"
    )
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--report-steps", type=int, default=50, help="extrapolation target")
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", choices=("small", "full", "none"), default="small")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-mp4", action="store_true", help="skip writing the mp4")
    parser.add_argument(
        "--engine-args",
        type=json.loads,
        default={},
        help='extra FastVideoArgs for ours, JSON (e.g. \'{"attention_backend": "FLASH_ATTN"}\')',
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser


def main() -> None:
    parser = build_parser()
    parser.add_argument("--systems", default="ours,diffusers")
    parser.add_argument("--repeats", type=int, default=1, help="measured requests (median)")
    ns = parser.parse_args()
    quiet_libraries()
    folder = model_folder(ns, ns.size)
    frames, height, width = request_shape(ns, ns.size)
    request = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=ns.steps,
        guidance_scale=ns.guidance_scale,
        seed=ns.seed,
        fps=16,
    )
    results: dict[str, Any] = {
        **environment(ns.device),
        "size": ns.size,
        "model_folder": str(folder),
        "video": [frames, height, width],
        "steps": ns.steps,
        "report_steps": ns.report_steps,
        "guidance_scale": ns.guidance_scale,
        "warmup": ns.warmup,
        "engine_args": ns.engine_args,
        "systems": {},
    }
    outputs: dict[str, np.ndarray] = {}
    runners = {"ours": run_ours, "diffusers": run_diffusers}
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        for name in ns.systems.split(","):
            result, outputs[name] = runners[name](folder, request, ns, Path(tmp))
            result["extrapolated_total_s"] = extrapolate(result, ns.steps, ns.report_steps)
            results["systems"][name] = result
            print(json.dumps({name: result}), flush=True)
            if ns.json:  # partial results survive a run cut short
                Path(ns.json).write_text(json.dumps(results, indent=2))
    if "ours" in outputs and "diffusers" in outputs:
        results["max_abs_diff_frames"] = float(np.abs(outputs["ours"] - outputs["diffusers"]).max())
    print(json.dumps(results, indent=2))
    print()
    print(markdown(results))
    if ns.json:
        Path(ns.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
