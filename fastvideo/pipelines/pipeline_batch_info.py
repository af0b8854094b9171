"""The state that flows through a pipeline's stages.

Kept small and typed: request fields first, then what stages produce. Model-specific extras
that no shared stage reads go in ``extra`` rather than growing this class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class StepProgress:
    """What a step callback is told after each denoising step."""

    step: int  # 1-based: the number of steps finished
    num_steps: int
    timestep: float
    elapsed_s: float  # since the denoising loop started


#: ``callback(progress) -> bool | None``; returning True asks the pipeline to stop.
StepCallback = Callable[[StepProgress], "bool | None"]


class GenerationCancelled(RuntimeError):
    """A step callback asked the pipeline to stop."""


@dataclass
class ForwardBatch:
    # What was asked for.
    prompt: str | list[str] | None = None
    negative_prompt: str | list[str] | None = None
    image: Any = None  # PIL image (image-to-video)
    height: int = 480
    width: int = 832
    num_frames: int = 81
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    #: The low-noise expert's guidance scale (Wan2.2's ``transformer_2``); None: the same as
    #: ``guidance_scale``. Whether guidance runs at all follows ``guidance_scale`` alone, as
    #: in diffusers.
    guidance_scale_2: float | None = None
    seed: int | None = None
    fps: int = 16
    max_sequence_length: int = 512
    callback: StepCallback | None = None

    #: Where the initial noise comes from: seeded from ``seed`` by the input validation stage
    #: unless the request brings one (a list: one generator per video of the batch).
    generator: torch.Generator | list[torch.Generator] | None = None
    #: (B, z_dim, T, h, w): the initial noise, drawn by the latent preparation stage (a request
    #: may bring it already drawn, as diffusers' ``latents=``; then no seed is drawn), then
    #: the denoising stage's output.
    latents: torch.Tensor | None = None

    # What stages produce.
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    #: Extra channels concatenated to the latents at every step (image-to-video condition).
    condition_latents: torch.Tensor | None = None
    #: Decoded video, (B, 3, T, H, W) float32 in [0, 1].
    output: torch.Tensor | None = None

    stage_timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return len(self.prompt) if isinstance(self.prompt, list) else 1

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1.0
