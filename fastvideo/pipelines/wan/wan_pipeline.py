"""Wan2.1 text-to-video: UMT5 prompt encoding, flow-matching denoising with the Wan DiT,
Wan VAE decoding. Numerically the same as diffusers' ``WanPipeline``."""

from __future__ import annotations

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.pipelines.composed_pipeline_base import ComposedPipelineBase
from fastvideo.pipelines.stages import (
    DecodingStage,
    DenoisingStage,
    InputValidationStage,
    LatentPreparationStage,
    T5TextEncodingStage,
    TimestepPreparationStage,
)


def check_wan21_model_index(index: dict, pipeline: str) -> None:
    """Refuse Wan2.2 folders (two experts, expanded timesteps): this port is Wan2.1."""
    if index.get("transformer_2") not in (None, [None, None]):
        raise ValueError(
            f"{pipeline}: model_index.json has 'transformer_2' (Wan2.2); not supported"
        )
    if index.get("boundary_ratio") is not None:
        raise ValueError(
            f"{pipeline}: model_index.json sets 'boundary_ratio' (Wan2.2); not supported"
        )
    if index.get("expand_timesteps"):
        raise ValueError(
            f"{pipeline}: model_index.json sets 'expand_timesteps' (Wan2.2); not supported"
        )


def wan_input_validation(
    pipeline: ComposedPipelineBase, requires_image: bool
) -> InputValidationStage:
    vae = pipeline.get_module("vae")
    patch = pipeline.get_module("transformer").config.patch_size
    return InputValidationStage(
        spatial_multiple=vae.config.scale_factor_spatial * max(patch[1], patch[2]),
        temporal_factor=vae.config.scale_factor_temporal,
        requires_image=requires_image,
    )


class WanPipeline(ComposedPipelineBase):
    _required_config_modules = ["text_encoder", "tokenizer", "vae", "transformer", "scheduler"]

    def validate_model_index(self, index: dict) -> None:
        check_wan21_model_index(index, type(self).__name__)

    def create_pipeline_stages(self, fastvideo_args: FastVideoArgs) -> None:
        self.add_stage("input_validation_stage", wan_input_validation(self, requires_image=False))
        self.add_stage(
            "prompt_encoding_stage",
            T5TextEncodingStage(
                text_encoder=self.get_module("text_encoder"), tokenizer=self.get_module("tokenizer")
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
        self.add_stage(
            "denoising_stage",
            DenoisingStage(
                transformer=self.get_module("transformer"), scheduler=self.get_module("scheduler")
            ),
        )
        self.add_stage("decoding_stage", DecodingStage(vae=self.get_module("vae")))


EntryClass = WanPipeline
