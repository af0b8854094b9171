"""``fastvideo generate ...``: render one video to an mp4 from the command line."""

from __future__ import annotations

import argparse
import sys

import fastvideo
from fastvideo.fastvideo_args import PRECISIONS


def package_version() -> str:
    """The installed distribution's version, or ``fastvideo.__version__`` from a source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastvideo-batch")
    except PackageNotFoundError:
        return fastvideo.__version__


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default; an option whose default is None says what
    None means in its own help (with "default:"), and required ones say so."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.required:
            return f"{text} (required)".strip()
        if action.default is None or "default:" in text or "%(default)" in text:
            return text
        return super()._get_help_string(action)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvideo", description="FastVideo engine CLI")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser(
        "generate",
        help="generate one video",
        description="Render one video to an mp4.",
        formatter_class=_HelpFormatter,
    )
    gen.add_argument(
        "--model-path", required=True, help="diffusers-format model folder or HF repo id"
    )
    gen.add_argument("--prompt", required=True, help="what the video shows")
    gen.add_argument(
        "--negative-prompt", default=None, help="what it should not show (default: none)"
    )
    gen.add_argument("--image", default=None, help="input image for image-to-video (default: none)")
    gen.add_argument("--output-path", required=True, help="where to write the .mp4")
    gen.add_argument("--height", type=int, default=480, help="frame height in pixels")
    gen.add_argument("--width", type=int, default=832, help="frame width in pixels")
    gen.add_argument("--num-frames", type=int, default=81, help="frames in the video")
    gen.add_argument("--num-inference-steps", type=int, default=50, help="denoising steps")
    gen.add_argument(
        "--guidance-scale", type=float, default=5.0, help="classifier-free guidance scale"
    )
    gen.add_argument(
        "--seed", type=int, default=None, help="noise seed (default: random, printed at the end)"
    )
    gen.add_argument("--fps", type=int, default=16, help="frame rate of the mp4")
    gen.add_argument(
        "--device", default=None, help="cuda, cuda:N or cpu (default: cuda if present, else cpu)"
    )
    gen.add_argument(
        "--pipeline",
        dest="pipeline_class_name",
        default=None,
        help="pipeline class to use instead of the one model_index.json names "
        "(default: model_index.json's)",
    )
    gen.add_argument(
        "--attention-backend",
        default=None,
        help="e.g. TORCH_SDPA, FLASH_ATTN (default: chosen automatically)",
    )
    gen.add_argument("--num-gpus", type=int, default=None, help="ranks for one video (default: 1)")
    gen.add_argument(
        "--sp-size",
        type=int,
        default=None,
        help="sequence-parallel degree (default: num-gpus, halved with --cfg-parallel)",
    )
    gen.add_argument(
        "--tp-size", type=int, default=None, help="text-encoder tensor parallel (default: 1)"
    )
    gen.add_argument(
        "--cfg-parallel",
        action="store_true",
        default=None,
        help="run the two guidance branches on separate GPU groups (default: off)",
    )
    gen.add_argument(
        "--enable-torch-compile",
        action="store_true",
        default=None,
        help="compile the DiT blocks (the first step pays about a minute, later ones run "
        "faster) (default: off)",
    )
    gen.add_argument(
        "--sta-window",
        default=None,
        help="sliding-tile window in tiles per axis, e.g. 3,3,3 (with --attention-backend "
        "SLIDING_TILE_ATTN) (default: 3,3,3)",
    )
    gen.add_argument(
        "--step-cache-threshold",
        type=float,
        default=None,
        help="skip DiT forwards whose input changed less than this (TeaCache-style) (default: off)",
    )
    for component, default in (
        ("dit", "bf16 on GPU, fp32 on CPU"),
        ("vae", "fp32"),
        ("text-encoder", "bf16 on GPU, fp32 on CPU"),
        ("image-encoder", "fp32"),
    ):
        gen.add_argument(
            f"--{component}-precision",
            choices=list(PRECISIONS),
            default=None,
            help=f"precision of the {component} weights (default: {default})",
        )
    gen.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _triple(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} must be three comma-separated ints, got {text!r}") from None


def _generate(ns: argparse.Namespace) -> int:
    # Here, not at the top: ``fastvideo --help`` and ``--version`` need no diffusers.
    from fastvideo.entrypoints.video_generator import VideoGenerator, device_problem

    problem = device_problem(ns.device)
    if problem is not None:
        reason, instead = problem
        raise ValueError(f"--device {ns.device}: {reason}; use --device {instead}")
    engine_args = {
        "device": ns.device,
        "pipeline_class_name": ns.pipeline_class_name,
        "attention_backend": ns.attention_backend,
        "dit_precision": ns.dit_precision,
        "vae_precision": ns.vae_precision,
        "text_encoder_precision": ns.text_encoder_precision,
        "image_encoder_precision": ns.image_encoder_precision,
        "num_gpus": ns.num_gpus,
        "sp_size": ns.sp_size,
        "tp_size": ns.tp_size,
        "cfg_parallel": ns.cfg_parallel,
        "enable_torch_compile": ns.enable_torch_compile,
        "sta_window": _triple(ns.sta_window, "--sta-window"),
        "step_cache_threshold": ns.step_cache_threshold,
    }
    generator = VideoGenerator.from_pretrained(
        ns.model_path, **{k: v for k, v in engine_args.items() if v is not None}
    )
    try:  # close() stops the rank processes of a multi-GPU generator
        result = generator.generate_video(
            ns.prompt,
            negative_prompt=ns.negative_prompt,
            image=ns.image,
            height=ns.height,
            width=ns.width,
            num_frames=ns.num_frames,
            num_inference_steps=ns.num_inference_steps,
            guidance_scale=ns.guidance_scale,
            seed=ns.seed,
            fps=ns.fps,
            output_path=ns.output_path,
            return_frames=False,
            progress=not ns.no_progress,
        )
    finally:
        generator.close()
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in result.stage_timings.items())
    print(
        f"wrote {result.video_path} ({result.num_frames} frames, {result.width}x{result.height}, "
        f"{result.fps} fps, seed {result.seed}); {timings}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = _build_parser().parse_args(argv)
    try:
        return _generate(ns)
    except ValueError as err:
        # Bad input is the user's to fix: say what, without a traceback.
        print(f"fastvideo: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
