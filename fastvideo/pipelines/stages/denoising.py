"""The denoising loop: DiT forward (twice under classifier-free guidance), scheduler step."""

from __future__ import annotations

import time

import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.pipelines.pipeline_batch_info import ForwardBatch, GenerationCancelled, StepProgress
from fastvideo.pipelines.stages.base import PipelineStage
from fastvideo.utils.torch_utils import module_dtype


class DenoisingStage(PipelineStage):
    def __init__(self, transformer, scheduler) -> None:
        super().__init__()
        self.transformer = transformer
        self.scheduler = scheduler

    def _predict(self, model_input, timestep, text, image) -> torch.Tensor:
        kwargs = {"encoder_hidden_states_image": image} if image is not None else {}
        return self.transformer(
            hidden_states=model_input, timestep=timestep, encoder_hidden_states=text, **kwargs
        )

    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        if batch.latents is None or batch.timesteps is None or batch.prompt_embeds is None:
            raise ValueError("DenoisingStage needs latents, timesteps and prompt_embeds")
        dtype = module_dtype(self.transformer)
        text = batch.prompt_embeds.to(dtype)
        negative = (
            batch.negative_prompt_embeds.to(dtype)
            if batch.do_classifier_free_guidance and batch.negative_prompt_embeds is not None
            else None
        )
        image = batch.image_embeds.to(dtype) if batch.image_embeds is not None else None
        latents = batch.latents
        num_steps = len(batch.timesteps)
        started = time.perf_counter()
        for index, t in enumerate(batch.timesteps):
            model_input = latents
            if batch.condition_latents is not None:
                model_input = torch.cat([latents, batch.condition_latents], dim=1)
            model_input = model_input.to(dtype)
            timestep = t.expand(latents.shape[0])
            noise_pred = self._predict(model_input, timestep, text, image)
            if negative is not None:
                noise_uncond = self._predict(model_input, timestep, negative, image)
                noise_pred = noise_uncond + batch.guidance_scale * (noise_pred - noise_uncond)
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if batch.callback is not None:
                progress = StepProgress(
                    index + 1, num_steps, float(t), time.perf_counter() - started
                )
                if batch.callback(progress):
                    raise GenerationCancelled(
                        f"stopped by the step callback after step {index + 1}"
                    )
        batch.latents = latents
        return batch
