"""Turn the input image into the latent condition the image-to-video DiT reads.

The DiT input at every step is ``cat([noisy latents, mask, image latents], channels)``:
``image latents`` encode the first frame followed by black frames, and ``mask`` (one channel
per frame folded into the VAE's temporal factor) marks which frames are given.
"""

from __future__ import annotations

import torch
from diffusers.video_processor import VideoProcessor

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.pipelines.pipeline_batch_info import ForwardBatch
from fastvideo.pipelines.stages.base import PipelineStage
from fastvideo.pipelines.stages.latent_preparation import latent_grid
from fastvideo.utils.torch_utils import module_device, module_dtype


def normalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
    return (latents - mean) * inv_std


def denormalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
    return latents / inv_std + mean


class ConditioningStage(PipelineStage):
    def __init__(self, vae) -> None:
        super().__init__()
        self.vae = vae
        self.video_processor = VideoProcessor(vae_scale_factor=vae.config.scale_factor_spatial)

    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        if batch.image is None:
            return batch
        device = fastvideo_args.torch_device
        temporal = self.vae.config.scale_factor_temporal
        frames, lat_h, lat_w = latent_grid(self.vae, batch.num_frames, batch.height, batch.width)

        image = self.video_processor.preprocess(batch.image, height=batch.height, width=batch.width)
        image = image.to(device, torch.float32).unsqueeze(2)  # (B, 3, 1, H, W) in [-1, 1]
        rest = image.new_zeros(image.shape[0], 3, batch.num_frames - 1, batch.height, batch.width)
        video = torch.cat([image, rest], dim=2)
        video = video.to(module_device(self.vae), module_dtype(self.vae))
        image_latents = self.vae.encode(video).mode()
        image_latents = image_latents.repeat(batch.batch_size, 1, 1, 1, 1)
        image_latents = normalize_latents(self.vae, image_latents.to(device, torch.float32))

        # Frame 0 is given, the rest are to be generated; frame 0's flag is repeated
        # ``temporal`` times so that the mask folds evenly into latent frames.
        mask = torch.zeros(batch.batch_size, 1, batch.num_frames, lat_h, lat_w)
        mask[:, :, 0] = 1
        mask = torch.cat([mask[:, :, :1].repeat_interleave(temporal, dim=2), mask[:, :, 1:]], dim=2)
        mask = mask.view(batch.batch_size, frames, temporal, lat_h, lat_w).transpose(1, 2)
        batch.condition_latents = torch.cat([mask.to(device), image_latents], dim=1)
        return batch
