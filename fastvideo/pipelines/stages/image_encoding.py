"""Input image -> CLIP vision features that the DiT cross-attends to (image-to-video)."""

from __future__ import annotations

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.pipelines.pipeline_batch_info import ForwardBatch
from fastvideo.pipelines.stages.base import PipelineStage
from fastvideo.utils.torch_utils import module_device, module_dtype


class CLIPImageEncodingStage(PipelineStage):
    """Uses the penultimate hidden layer, the features Wan2.1 image-to-video was trained on."""

    def __init__(self, image_encoder, image_processor) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.image_processor = image_processor

    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        if batch.image is None:
            raise ValueError("image is required for CLIP image encoding")
        pixels = self.image_processor(images=batch.image, return_tensors="pt").pixel_values
        pixels = pixels.to(module_device(self.image_encoder), module_dtype(self.image_encoder))
        hidden = self.image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[
            -2
        ]
        batch.image_embeds = hidden.repeat(batch.batch_size, 1, 1)
        return batch
