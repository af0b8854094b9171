"""Draw the initial noise in the VAE's latent space."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.pipelines.pipeline_batch_info import ForwardBatch
from fastvideo.pipelines.stages.base import PipelineStage


def latent_grid(vae, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(frames, height, width) of the latent a video of this size encodes to."""
    return latent_grid_of(vae.config, num_frames, height, width)


def latent_grid_of(vae_config, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """:func:`latent_grid` from the VAE's config alone (``scale_factor_temporal``/``_spatial``)."""
    temporal = vae_config.scale_factor_temporal
    spatial = vae_config.scale_factor_spatial
    return (num_frames - 1) // temporal + 1, height // spatial, width // spatial


def noise_shape(
    vae_config, batch_size: int, num_frames: int, height: int, width: int
) -> tuple[int, int, int, int, int]:
    """(B, z_dim, frames, height, width): the initial noise of ``batch_size`` videos."""
    return (batch_size, vae_config.z_dim, *latent_grid_of(vae_config, num_frames, height, width))


def draw_noise(
    shape: tuple[int, ...],
    generator: torch.Generator | list[torch.Generator] | None,
    device: torch.device,
) -> torch.Tensor:
    """Noise exactly as diffusers' Wan pipelines draw it: ``randn_tensor(shape, generator,
    device, float32)``. A CPU generator draws on the CPU (the same noise on any device); a
    list draws one video per generator."""
    return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)


class LatentPreparationStage(PipelineStage):
    """``batch.latents``: the noise drawn from ``batch.generator``, or, when the request
    brings initial latents (as diffusers' ``latents=``), those, checked and moved to the
    device."""

    def __init__(self, scheduler, vae) -> None:
        super().__init__()
        self.scheduler = scheduler
        self.vae = vae

    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        shape = noise_shape(
            self.vae.config, batch.batch_size, batch.num_frames, batch.height, batch.width
        )
        device = fastvideo_args.torch_device
        if batch.latents is not None:
            if tuple(batch.latents.shape) != shape:
                raise ValueError(
                    f"latents has shape {tuple(batch.latents.shape)}; this request needs {shape}"
                )
            noise = batch.latents.to(device, torch.float32)
        else:
            noise = draw_noise(shape, batch.generator, device)
        sigma = getattr(self.scheduler, "init_noise_sigma", 1.0)
        batch.latents = noise * sigma
        return batch
