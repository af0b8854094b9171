"""Few-step denoising of a DMD-distilled model (FastVideo's FastWan: 3 steps, no guidance).

At each timestep of a fixed list (``[1000, 757, 522]`` unless the model folder says
otherwise) the DiT's flow prediction ``v`` gives the clean latents ``x0 = x_t - sigma_t * v``;
before the next timestep they are noised again, ``x_t' = (1 - sigma_t') * x0 + sigma_t' *
noise``, with fresh noise drawn from the request's generator; the last ``x0`` is the result.
``sigma_t`` is the training schedule's (a flow-matching Euler schedule of
``num_train_timesteps`` entries with the model's shift) at the nearest timestep. The two
formulas run in float64, as the distilled models were trained. One DiT forward per step:
no classifier-free guidance (distillation baked it in).

Across ranks: the noise is drawn the same on every rank (the same seeded CPU generator), so
the ranks stay in lockstep as in ``DenoisingStage``.
"""

from __future__ import annotations

import time

import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.pipelines.pipeline_batch_info import ForwardBatch, GenerationCancelled, StepProgress
from fastvideo.pipelines.stages.base import PipelineStage
from fastvideo.pipelines.stages.denoising import broadcast_stop
from fastvideo.pipelines.stages.latent_preparation import draw_noise
from fastvideo.utils.torch_utils import module_dtype

#: FastWan's three steps.
DEFAULT_DMD_STEPS = (1000, 757, 522)


def training_schedule(shift: float, num_train_timesteps: int = 1000):
    """(timesteps, sigmas) of the training noise schedule: flow matching with ``shift``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    schedule = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
    return schedule.timesteps.double(), schedule.sigmas.double()


class DmdDenoisingStage(PipelineStage):
    def __init__(self, transformer, shift: float, steps=DEFAULT_DMD_STEPS) -> None:
        super().__init__()
        if not steps or any(not 0 < int(t) <= 1000 for t in steps):
            raise ValueError(f"dmd_denoising_steps must be timesteps in 1..1000, got {steps!r}")
        self.transformer = transformer
        self.steps = tuple(int(t) for t in steps)
        self.train_timesteps, self.train_sigmas = training_schedule(shift)

    def sigma(self, timestep: int) -> float:
        index = torch.argmin((self.train_timesteps - float(timestep)).abs())
        return float(self.train_sigmas[index])

    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        if batch.latents is None or batch.prompt_embeds is None:
            raise ValueError("DmdDenoisingStage needs latents and prompt_embeds")
        dtype = module_dtype(self.transformer)
        text = batch.prompt_embeds.to(dtype)
        latents = batch.latents
        started = time.perf_counter()
        for index, t in enumerate(self.steps):
            timestep = torch.full((latents.shape[0],), float(t), device=latents.device)
            flow = self.transformer(
                hidden_states=latents.to(dtype), timestep=timestep, encoder_hidden_states=text
            )
            clean = latents.double() - self.sigma(t) * flow.double()
            if index + 1 < len(self.steps):
                following = self.sigma(self.steps[index + 1])
                # As the first noise was drawn: the request's generator(s), float32.
                noise = draw_noise(tuple(latents.shape), batch.generator, latents.device).double()
                latents = ((1 - following) * clean + following * noise).to(latents.dtype)
            else:
                latents = clean.to(latents.dtype)
            stop = False
            if batch.callback is not None:
                progress = StepProgress(index + 1, len(self.steps), float(t),
                                        time.perf_counter() - started)  # fmt: skip
                stop = bool(batch.callback(progress))
            if broadcast_stop(stop, latents.device):
                raise GenerationCancelled(f"stopped by the step callback after step {index + 1}")
        batch.latents = latents
        return batch
