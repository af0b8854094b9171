"""Wan text-to-video (Wan2.1, and Wan2.2's two experts): UMT5 prompt encoding,
flow-matching denoising with the Wan DiT(s), Wan VAE decoding. Numerically the same as
diffusers' ``WanPipeline``."""

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


def check_wan_model_index(index: dict, pipeline: str, two_experts: bool) -> None:
    """Refuse what this port cannot run: Wan2.2's expanded timesteps (TI2V-5B) always; its
    two experts (``transformer_2`` + ``boundary_ratio``) unless ``two_experts``, and then only
    together."""
    has_second = index.get("transformer_2") not in (None, [None, None])
    has_boundary = index.get("boundary_ratio") is not None
    if (has_second or has_boundary) and not two_experts:
        raise ValueError(
            f"{pipeline}: model_index.json has Wan2.2's two experts (transformer_2, "
            "boundary_ratio); not supported by this pipeline"
        )
    if has_second != has_boundary:
        missing = "boundary_ratio" if has_second else "transformer_2"
        raise ValueError(f"{pipeline}: model_index.json has Wan2.2's experts without {missing}")
    if has_boundary and not 0 < float(index["boundary_ratio"]) < 1:
        raise ValueError(
            f"{pipeline}: model_index.json's boundary_ratio must be between 0 and 1, "
            f"got {index['boundary_ratio']!r}"
        )
    if index.get("expand_timesteps"):
        raise ValueError(
            f"{pipeline}: model_index.json sets 'expand_timesteps' (Wan2.2 TI2V); not supported"
        )


def check_wan21_model_index(index: dict, pipeline: str) -> None:
    """Wan2.1 folders only (one expert, no expanded timesteps)."""
    check_wan_model_index(index, pipeline, two_experts=False)


def wan_input_validation(
    pipeline: ComposedPipelineBase, requires_image: bool
) -> InputValidationStage:
    vae = pipeline.get_module("vae")
    patch = pipeline.get_module("transformer").config.patch_size
    return InputValidationStage(
        spatial_multiple=vae.config.scale_factor_spatial * max(patch[1], patch[2]),
        temporal_factor=vae.config.scale_factor_temporal,
        requires_image=requires_image,
        two_experts=pipeline.get_module("transformer_2") is not None,
    )


class WanPipeline(ComposedPipelineBase):
    """Wan2.1 text-to-video, and Wan2.2's two-expert one (T2V-A14B: ``transformer_2`` and
    ``boundary_ratio`` in ``model_index.json``), as diffusers' ``WanPipeline`` runs both."""

    _required_config_modules = ["text_encoder", "tokenizer", "vae", "transformer", "scheduler"]
    _optional_config_modules = ["transformer_2"]

    def validate_model_index(self, index: dict) -> None:
        check_wan_model_index(index, type(self).__name__, two_experts=True)

    def initialize_pipeline(self, fastvideo_args: FastVideoArgs) -> None:
        ratio = self.model_index.get("boundary_ratio")
        self.boundary_ratio = float(ratio) if ratio is not None else None

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
                transformer=self.get_module("transformer"),
                scheduler=self.get_module("scheduler"),
                transformer_2=self.get_module("transformer_2"),
                boundary_ratio=self.boundary_ratio,
            ),
        )
        self.add_stage("decoding_stage", DecodingStage(vae=self.get_module("vae")))


EntryClass = WanPipeline
