"""Build the pipeline a model folder names, and run one request on it (or only its
text-encoding stage: :func:`encode_prompt`).

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
from fastvideo.pipelines.stages.text_encoding import TextEncodingStage

#: Request fields that are tensors: they reach the ranks of a multi-rank run as
#: :class:`WireTensor`.
TENSOR_FIELDS = ("prompt_embeds", "negative_prompt_embeds")


@dataclass
class RenderOutput:
    """What one pipeline run hands back: the frames of the single video, its seed, timings."""

    frames: np.ndarray  # (num_frames, height, width, 3) float32 in [0, 1]
    seed: int | None  # None when the request brought its own generator or noise
    stage_timings: dict[str, float]


@dataclass
class WireTensor:
    """A tensor as the executor's connection carries it, bit for bit: its bytes and dtype.

    A torch tensor sent over that connection would travel as a shared-memory handle, which
    the caller and the rank processes (unrelated processes) cannot open; numpy has no
    bfloat16. So the bytes go as a uint8 array and come back as the same dtype and values.
    """

    data: np.ndarray  # uint8, the tensor's shape with the last dim x element size
    dtype: str  # "bfloat16", "float32", ...

    @classmethod
    def pack(cls, tensor: torch.Tensor) -> WireTensor:
        flat = tensor.detach().cpu().contiguous()
        return cls(flat.view(torch.uint8).numpy().copy(), str(flat.dtype).removeprefix("torch."))

    def unpack(self) -> torch.Tensor:
        return torch.from_numpy(self.data.copy()).view(getattr(torch, self.dtype))


def _unpacked(request: dict[str, Any]) -> dict[str, Any]:
    """The request with arrays and :class:`WireTensor` fields as tensors again."""
    request = dict(request)
    if isinstance(request.get("latents"), np.ndarray):
        request["latents"] = torch.from_numpy(request["latents"])
    for name in TENSOR_FIELDS:
        if isinstance(request.get(name), WireTensor):
            request[name] = request[name].unpack()
    return request


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
    initial ``latents`` may come as an array and text embeddings as :class:`WireTensor`, as
    they reach the ranks of a multi-rank run)."""
    batch = pipeline.forward(ForwardBatch(**_unpacked(request), callback=callback), args)
    # (B, 3, T, H, W) -> (T, H, W, 3) of the single video.
    frames = batch.output[0].permute(1, 2, 3, 0).cpu().numpy().astype(np.float32)
    return RenderOutput(frames=frames, seed=batch.seed, stage_timings=dict(batch.stage_timings))


def text_encoding_stage(pipeline: ComposedPipelineBase) -> TextEncodingStage:
    for stage in pipeline.stages:
        if isinstance(stage, TextEncodingStage):
            return stage
    raise ValueError(f"{type(pipeline).__name__} has no text-encoding stage")


@torch.inference_mode()
def encode_prompt(
    pipeline: ComposedPipelineBase, args: FastVideoArgs, request: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run only ``pipeline``'s text-encoding stage on ``request`` (``ForwardBatch`` fields:
    ``prompt``, ``negative_prompt``, ``guidance_scale``, ``max_sequence_length``, and
    embeddings already known, which are not encoded again): ``(prompt_embeds,
    negative_prompt_embeds)``, the second None without guidance. The same tensors the
    stage hands the denoising stage when it renders the request."""
    batch = text_encoding_stage(pipeline)(ForwardBatch(**_unpacked(request)), args)
    assert batch.prompt_embeds is not None
    return batch.prompt_embeds, batch.negative_prompt_embeds
