"""Build the pipeline a model folder names, and run one request on it.

What a single-process ``VideoGenerator`` and every rank of a multi-rank one
(``fastvideo.executor.rank_main``) share; it sits below both, so neither imports the other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.models.loader.model_folder import read_model_index, resolve_model_path
from fastvideo.pipelines.composed_pipeline_base import ComposedPipelineBase
from fastvideo.pipelines.pipeline_batch_info import ForwardBatch, StepCallback
from fastvideo.pipelines.pipeline_registry import get_pipeline_class


@dataclass
class RenderOutput:
    """What one pipeline run hands back: the frames of the single video, its seed, timings."""

    frames: np.ndarray  # (num_frames, height, width, 3) float32 in [0, 1]
    seed: int | None  # None when the request brought its own generator or noise
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
    """Run ``pipeline`` on one request (``ForwardBatch`` fields, the image already loaded;
    initial ``latents`` may come as an array, as they reach the ranks of a multi-rank run)."""
    if isinstance(request.get("latents"), np.ndarray):
        request = {**request, "latents": torch.from_numpy(request["latents"])}
    batch = pipeline.forward(ForwardBatch(**request, callback=callback), args)
    # (B, 3, T, H, W) -> (T, H, W, 3) of the single video.
    frames = batch.output[0].permute(1, 2, 3, 0).cpu().numpy().astype(np.float32)
    return RenderOutput(frames=frames, seed=batch.seed, stage_timings=dict(batch.stage_timings))
