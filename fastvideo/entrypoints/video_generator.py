"""The public entry point: load a model folder once, generate many videos."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.models.loader.model_folder import read_model_index, resolve_model_path
from fastvideo.pipelines.composed_pipeline_base import ComposedPipelineBase
from fastvideo.pipelines.pipeline_batch_info import ForwardBatch, StepCallback
from fastvideo.pipelines.pipeline_registry import get_pipeline_class


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


class VideoGenerator:
    def __init__(self, pipeline: ComposedPipelineBase, fastvideo_args: FastVideoArgs) -> None:
        self.pipeline = pipeline
        self.fastvideo_args = fastvideo_args

    @classmethod
    def from_pretrained(cls, model_path: str | os.PathLike, **kwargs: Any) -> VideoGenerator:
        """Load the pipeline ``model_index.json`` names (or ``pipeline_class_name=``)."""
        args = FastVideoArgs.from_kwargs(str(model_path), **kwargs)
        folder = resolve_model_path(model_path)
        index = read_model_index(folder)
        pipeline_cls = get_pipeline_class(args.pipeline_class_name or index["_class_name"])
        return cls(pipeline_cls(folder, args), args)

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
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        batch = ForwardBatch(
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
            callback=callback,
        )
        batch = self.pipeline.forward(batch, self.fastvideo_args)
        # (B, 3, T, H, W) -> (T, H, W, 3) of the single video.
        frames = batch.output[0].permute(1, 2, 3, 0).cpu().numpy().astype(np.float32)
        timings = dict(batch.stage_timings)
        video_path = None
        if output_path is not None:
            from fastvideo.utils.video_io import write_mp4

            started = time.perf_counter()
            video_path = write_mp4(frames, output_path, fps=fps)
            timings["mp4_encode"] = time.perf_counter() - started
        return GenerationResult(
            frames=frames if return_frames else None,
            video_path=video_path,
            seed=batch.seed,
            fps=fps,
            num_frames=frames.shape[0],
            height=frames.shape[1],
            width=frames.shape[2],
            stage_timings=timings,
        )
