"""Wan2.1 image-to-video: text-to-video plus the input image twice over, as CLIP features the
DiT cross-attends to and as VAE latents of the first frame concatenated to the noise.
Numerically the same as diffusers' ``WanImageToVideoPipeline``."""

from __future__ import annotations

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.pipelines.composed_pipeline_base import ComposedPipelineBase
from fastvideo.pipelines.stages import (
    CLIPImageEncodingStage,
    ConditioningStage,
    DecodingStage,
    DenoisingStage,
    LatentPreparationStage,
    T5TextEncodingStage,
    TimestepPreparationStage,
)
from fastvideo.pipelines.wan.wan_pipeline import check_wan21_model_index, wan_input_validation


class WanImageToVideoPipeline(ComposedPipelineBase):
    _required_config_modules = [
        "text_encoder",
        "tokenizer",
        "vae",
        "transformer",
        "scheduler",
        "image_encoder",
        "image_processor",
    ]

    def validate_model_index(self, index: dict) -> None:
        check_wan21_model_index(index, type(self).__name__)

    def create_pipeline_stages(self, fastvideo_args: FastVideoArgs) -> None:
        self.add_stage("input_validation_stage", wan_input_validation(self, requires_image=True))
        self.add_stage(
            "prompt_encoding_stage",
            T5TextEncodingStage(
                text_encoder=self.get_module("text_encoder"), tokenizer=self.get_module("tokenizer")
            ),
        )
        if self.get_module("transformer").config.image_dim is not None:
            self.add_stage(
                "image_encoding_stage",
                CLIPImageEncodingStage(
                    image_encoder=self.get_module("image_encoder"),
                    image_processor=self.get_module("image_processor"),
                ),
            )
        self.add_stage(
            "timestep_preparation_stage",
            TimestepPreparationStage(scheduler=self.get_module("scheduler")),
        )
        self.add_stage(
            "latent_preparation_stage",
            LatentPreparationStage(
                scheduler=self.get_module("scheduler"), vae=self.get_module("vae")
            ),
        )
        self.add_stage("conditioning_stage", ConditioningStage(vae=self.get_module("vae")))
        self.add_stage(
            "denoising_stage",
            DenoisingStage(
                transformer=self.get_module("transformer"), scheduler=self.get_module("scheduler")
            ),
        )
        self.add_stage("decoding_stage", DecodingStage(vae=self.get_module("vae")))


EntryClass = WanImageToVideoPipeline
