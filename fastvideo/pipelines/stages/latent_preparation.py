"""Draw the initial noise in the VAE's latent space."""

from __future__ import annotations

import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.pipelines.pipeline_batch_info import ForwardBatch
from fastvideo.pipelines.stages.base import PipelineStage


def latent_grid(vae, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(frames, height, width) of the latent a video of this size encodes to."""
    temporal = vae.config.scale_factor_temporal
    spatial = vae.config.scale_factor_spatial
    return (num_frames - 1) // temporal + 1, height // spatial, width // spatial


class LatentPreparationStage(PipelineStage):
    def __init__(self, scheduler, vae) -> None:
        super().__init__()
        self.scheduler = scheduler
        self.vae = vae

    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        frames, height, width = latent_grid(self.vae, batch.num_frames, batch.height, batch.width)
        shape = (batch.batch_size, self.vae.config.z_dim, frames, height, width)
        # Noise is drawn on the CPU generator so a seed gives the same video on any device.
        noise = torch.randn(shape, generator=batch.generator, dtype=torch.float32)
        sigma = getattr(self.scheduler, "init_noise_sigma", 1.0)
        batch.latents = (noise * sigma).to(fastvideo_args.torch_device)
        return batch
