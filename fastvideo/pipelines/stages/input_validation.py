"""Reject a request the pipeline cannot serve before any model runs."""

from __future__ import annotations

import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.pipelines.pipeline_batch_info import ForwardBatch
from fastvideo.pipelines.stages.base import PipelineStage


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_embeds(batch: ForwardBatch) -> None:
    """Precomputed text embeddings: (B, sequence, dim) tensors, the negative's shaped alike."""
    embeds, negative = batch.prompt_embeds, batch.negative_prompt_embeds
    for name, value in (("prompt_embeds", embeds), ("negative_prompt_embeds", negative)):
        if value is not None and (not isinstance(value, torch.Tensor) or value.ndim != 3):
            raise ValueError(
                f"{name} must be a (batch, sequence, dim) torch.Tensor, got "
                f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}"
            )
    if embeds is not None and negative is not None and negative.shape != embeds.shape:
        raise ValueError(
            f"negative_prompt_embeds must have prompt_embeds' shape {tuple(embeds.shape)}, got "
            f"{tuple(negative.shape)}"
        )


class InputValidationStage(PipelineStage):
    """Checks the request and seeds the random generator (from ``seed``, drawn when None),
    unless the request brings its own ``generator`` or initial ``latents``.

    With no arguments it checks only what holds for every pipeline. Pipelines pass the
    model's constraints: ``spatial_multiple`` (height and width must be multiples of it),
    ``temporal_factor`` (``num_frames - 1`` must be a multiple of it), ``requires_image``.
    """

    def __init__(
        self,
        spatial_multiple: int = 1,
        temporal_factor: int = 1,
        requires_image: bool = False,
        two_experts: bool = False,
    ) -> None:
        super().__init__()
        self.spatial_multiple = spatial_multiple
        self.temporal_factor = temporal_factor
        self.requires_image = requires_image
        #: The model has a low-noise expert (Wan2.2): ``guidance_scale_2`` applies.
        self.two_experts = two_experts

    def validate(self, batch: ForwardBatch) -> None:
        prompts = batch.prompt if isinstance(batch.prompt, list) else [batch.prompt]
        if batch.prompt_embeds is not None or batch.negative_prompt_embeds is not None:
            _check_embeds(batch)
        if batch.prompt_embeds is None and (
            not prompts or not all(isinstance(p, str) and p.strip() for p in prompts)
        ):
            raise ValueError("prompt must be a non-empty string (or a list of them)")
        if batch.negative_prompt is not None and batch.prompt is not None:
            negatives = (
                batch.negative_prompt
                if isinstance(batch.negative_prompt, list)
                else [batch.negative_prompt] * len(prompts)
            )
            if len(negatives) != len(prompts) or not all(isinstance(n, str) for n in negatives):
                raise ValueError("negative_prompt must be a string or a list as long as prompt")
        for name in ("height", "width", "num_frames", "num_inference_steps", "fps"):
            _positive_int(name, getattr(batch, name))
        for name in ("height", "width"):
            value = getattr(batch, name)
            multiple = self.spatial_multiple
            if value % multiple:
                nearest = max(value // multiple * multiple, multiple)
                raise ValueError(
                    f"{name}={value} must be a multiple of {multiple} for this model "
                    f"(e.g. {nearest} or {nearest + multiple})"
                )
        if (batch.num_frames - 1) % self.temporal_factor:
            factor = self.temporal_factor
            lower = (batch.num_frames - 1) // factor * factor + 1
            raise ValueError(
                f"num_frames={batch.num_frames} is not allowed: the VAE takes {factor}*k+1 "
                f"frames (e.g. {lower} or {lower + factor})"
            )
        if not isinstance(batch.guidance_scale, int | float) or batch.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a number >= 0, got {batch.guidance_scale!r}")
        if batch.guidance_scale_2 is not None:
            if not self.two_experts:
                raise ValueError(
                    "guidance_scale_2 applies only to a model with two experts (Wan2.2: "
                    "model_index.json has transformer_2 and boundary_ratio); this one has one"
                )
            scale = batch.guidance_scale_2
            if isinstance(scale, bool) or not isinstance(scale, int | float) or scale < 0:
                raise ValueError(f"guidance_scale_2 must be a number >= 0, got {scale!r}")
        if batch.seed is not None and (not isinstance(batch.seed, int) or batch.seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {batch.seed!r}")
        if self.requires_image and batch.image is None:
            raise ValueError("image is required: this is an image-to-video pipeline")

    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        self.validate(batch)
        if batch.generator is not None or batch.latents is not None:
            # The caller's generator, or the noise it already drew from one: no seed to
            # report (``batch.seed`` stays None), nothing to draw here.
            return batch
        if batch.seed is None:
            batch.seed = int(torch.randint(0, 2**31 - 1, ()).item())
        # A CPU generator gives the same noise on every device (diffusers' convention too).
        batch.generator = torch.Generator("cpu").manual_seed(batch.seed)
        return batch
