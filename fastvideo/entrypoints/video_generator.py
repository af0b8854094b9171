"""The public entry point: load a model folder once, generate many videos.

One process runs the pipeline itself; with ``num_gpus > 1`` the pipeline runs on long-lived
rank processes (``fastvideo.executor``) and this object only talks to rank 0.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.models.loader.model_folder import read_model_index, resolve_model_path
from fastvideo.pipelines.composed_pipeline_base import ComposedPipelineBase
from fastvideo.pipelines.pipeline_batch_info import ForwardBatch, StepCallback
from fastvideo.pipelines.pipeline_registry import get_pipeline_class

if TYPE_CHECKING:
    from fastvideo.executor import MultiRankExecutor


@dataclass
class GenerationResult:
    #: (num_frames, height, width, 3) float32 in [0, 1]; None when return_frames=False.
    frames: np.ndarray | None
    video_path: Path | None
    seed: int
    fps: int
    num_frames: int
    height: int
    width: int
    #: Wall seconds per stage (plus "mp4_encode" when a file was written).
    stage_timings: dict[str, float] = field(default_factory=dict)


def _load_image(image: Any) -> Any:
    """A PIL image from a PIL image, a path, or an (H, W, 3) uint8/float array."""
    from PIL import Image

    if image is None or isinstance(image, Image.Image):
        return image.convert("RGB") if image is not None else None
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"image={str(image)!r}: no such file")
        try:
            with Image.open(path) as opened:
                return opened.convert("RGB")
        except OSError as err:
            raise ValueError(f"image={str(image)!r} is not a readable image ({err})") from None
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 3:
        data = (
            image
            if image.dtype == np.uint8
            else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        )
        return Image.fromarray(data)
    raise ValueError(
        f"image must be a PIL image, a file path or an (H, W, 3) array, got {type(image).__name__}"
    )


@dataclass
class RenderOutput:
    """What one pipeline run hands back: the frames of the single video, its seed, timings."""

    frames: np.ndarray  # (num_frames, height, width, 3) float32 in [0, 1]
    seed: int
    stage_timings: dict[str, float]


def build_pipeline(model_path: str | os.PathLike, args: FastVideoArgs) -> ComposedPipelineBase:
    """Load the pipeline ``model_index.json`` names (or ``args.pipeline_class_name``).

    In a multi-rank run, every rank calls this after its process groups exist: parallel
    layers read their TP/SP coordinates when they are built.
    """
    folder = resolve_model_path(model_path)
    index = read_model_index(folder)
    pipeline_cls = get_pipeline_class(args.pipeline_class_name or index["_class_name"])
    return pipeline_cls(folder, args)


def render(
    pipeline: ComposedPipelineBase,
    args: FastVideoArgs,
    request: dict[str, Any],
    callback: StepCallback | None = None,
) -> RenderOutput:
    """Run ``pipeline`` on one request (``ForwardBatch`` fields, the image already loaded)."""
    batch = pipeline.forward(ForwardBatch(**request, callback=callback), args)
    # (B, 3, T, H, W) -> (T, H, W, 3) of the single video.
    frames = batch.output[0].permute(1, 2, 3, 0).cpu().numpy().astype(np.float32)
    return RenderOutput(frames=frames, seed=batch.seed, stage_timings=dict(batch.stage_timings))


class VideoGenerator:
    """One loaded model. With ``num_gpus > 1`` the pipeline lives in long-lived rank
    processes (``fastvideo.executor``) and ``pipeline`` is None here; ``close()`` (or the
    ``with`` block, or interpreter exit) stops them."""

    def __init__(
        self,
        pipeline: ComposedPipelineBase | None,
        fastvideo_args: FastVideoArgs,
        executor: MultiRankExecutor | None = None,
    ) -> None:
        if (pipeline is None) == (executor is None):
            raise ValueError("VideoGenerator needs either a pipeline or a multi-rank executor")
        self.pipeline = pipeline
        self.fastvideo_args = fastvideo_args
        self.executor = executor

    @classmethod
    def from_pretrained(cls, model_path: str | os.PathLike, **kwargs: Any) -> VideoGenerator:
        """Load the pipeline ``model_index.json`` names (or ``pipeline_class_name=``).

        ``num_gpus=N`` (N > 1) starts N rank processes laid out by ``sp_size``, ``tp_size``
        and ``cfg_parallel`` and waits until every rank has loaded the pipeline. On a machine
        without GPUs, or with ``device="cpu"``, the ranks run on the CPU over gloo.
        """
        args = FastVideoArgs.from_kwargs(str(model_path), **kwargs)
        if args.num_gpus == 1:
            return cls(build_pipeline(model_path, args), args)
        folder = resolve_model_path(model_path)
        # Fail here, in the caller, on a folder no rank could load.
        get_pipeline_class(args.pipeline_class_name or read_model_index(folder)["_class_name"])
        from fastvideo.executor import MultiRankExecutor

        executor = MultiRankExecutor(folder, args)
        executor.start()
        return cls(None, args, executor=executor)

    def close(self) -> None:
        """Stop the rank processes of a multi-rank generator (a no-op otherwise)."""
        if self.executor is not None:
            self.executor.close()

    def __enter__(self) -> VideoGenerator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def generate_video(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        image: Any = None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        seed: int | None = None,
        fps: int = 16,
        output_path: str | os.PathLike | None = None,
        return_frames: bool = True,
        callback: StepCallback | None = None,
    ) -> GenerationResult:
        """Render one video. ``callback(progress)`` runs here, in the caller's process, after
        every denoising step; returning True stops the request with ``GenerationCancelled``
        (on every rank, after the same step)."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        request: dict[str, Any] = dict(
            prompt=prompt,
            negative_prompt=negative_prompt,
            image=_load_image(image),
            height=height,
            width=width,
            num_frames=num_frames,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            fps=fps,
        )
        if self.executor is not None:
            if seed is None:
                # Every rank must draw the same noise: choose the seed once, here.
                request["seed"] = secrets.randbelow(2**31 - 1)
            rendered = self.executor.generate(request, callback)
        else:
            assert self.pipeline is not None
            rendered = render(self.pipeline, self.fastvideo_args, request, callback)
        frames = rendered.frames
        timings = dict(rendered.stage_timings)
        video_path = None
        if output_path is not None:
            from fastvideo.utils.video_io import write_mp4

            started = time.perf_counter()
            video_path = write_mp4(frames, output_path, fps=fps)
            timings["mp4_encode"] = time.perf_counter() - started
        return GenerationResult(
            frames=frames if return_frames else None,
            video_path=video_path,
            seed=rendered.seed,
            fps=fps,
            num_frames=frames.shape[0],
            height=frames.shape[1],
            width=frames.shape[2],
            stage_timings=timings,
        )
