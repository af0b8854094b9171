"""Latents -> video frames in [0, 1]."""

from __future__ import annotations

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.pipelines.pipeline_batch_info import ForwardBatch
from fastvideo.pipelines.stages.base import PipelineStage
from fastvideo.pipelines.stages.conditioning import denormalize_latents
from fastvideo.utils.torch_utils import module_device, module_dtype


class DecodingStage(PipelineStage):
    def __init__(self, vae) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        if batch.latents is None:
            raise ValueError("DecodingStage needs latents")
        latents = batch.latents.to(module_device(self.vae), module_dtype(self.vae))
        if getattr(self.vae.config, "latents_mean", None) is not None:
            latents = denormalize_latents(self.vae, latents)
        video = self.vae.decode(latents)
        batch.output = (video.float() / 2 + 0.5).clamp(0, 1)
        return batch
