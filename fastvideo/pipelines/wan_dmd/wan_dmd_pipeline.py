"""Wan text-to-video with a DMD-distilled DiT (FastVideo's FastWan): the Wan pipeline's
stages with the few-step DMD denoising stage in place of the scheduler loop, and no
classifier-free guidance (the negative prompt is not encoded).

Selected by ``_class_name: "WanDMDPipeline"`` in ``model_index.json``, or by
``pipeline_class_name="WanDMDPipeline"`` for a folder that names ``WanPipeline``. The
timesteps come from ``model_index.json``'s ``dmd_denoising_steps`` (default ``[1000, 757,
522]``); the request's ``num_inference_steps`` and ``guidance_scale`` do not apply.
"""

from __future__ import annotations

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.pipelines.composed_pipeline_base import ComposedPipelineBase
from fastvideo.pipelines.pipeline_batch_info import ForwardBatch
from fastvideo.pipelines.stages import (
    DecodingStage,
    LatentPreparationStage,
    T5TextEncodingStage,
)
from fastvideo.pipelines.stages.base import PipelineStage
from fastvideo.pipelines.stages.dmd_denoising import DEFAULT_DMD_STEPS, DmdDenoisingStage
from fastvideo.pipelines.wan.wan_pipeline import check_wan21_model_index, wan_input_validation


class NoGuidanceStage(PipelineStage):
    """A distilled model runs without classifier-free guidance: whatever scale the request
    carries (the engine's default is 5.0), the prompt is encoded alone."""

    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        batch.guidance_scale = 1.0
        return batch


def scheduler_shift(scheduler) -> float:
    """The flow shift of the folder's scheduler (UniPC's ``flow_shift``, Euler's ``shift``)."""
    config = scheduler.config
    return float(config.get("flow_shift") or config.get("shift") or 1.0)


class WanDMDPipeline(ComposedPipelineBase):
    _required_config_modules = ["text_encoder", "tokenizer", "vae", "transformer", "scheduler"]

    def validate_model_index(self, index: dict) -> None:
        check_wan21_model_index(index, type(self).__name__)

    def initialize_pipeline(self, fastvideo_args: FastVideoArgs) -> None:
        steps = self.model_index.get("dmd_denoising_steps")
        self.dmd_steps = tuple(steps) if steps else DEFAULT_DMD_STEPS

    def create_pipeline_stages(self, fastvideo_args: FastVideoArgs) -> None:
        self.add_stage("input_validation_stage", wan_input_validation(self, requires_image=False))
        self.add_stage("no_guidance_stage", NoGuidanceStage())
        self.add_stage(
            "prompt_encoding_stage",
            T5TextEncodingStage(
                text_encoder=self.get_module("text_encoder"), tokenizer=self.get_module("tokenizer")
            ),
        )
        self.add_stage(
            "latent_preparation_stage",
            LatentPreparationStage(
                scheduler=self.get_module("scheduler"), vae=self.get_module("vae")
            ),
        )
        self.add_stage(
            "denoising_stage",
            DmdDenoisingStage(
                transformer=self.get_module("transformer"),
                shift=scheduler_shift(self.get_module("scheduler")),
                steps=self.dmd_steps,
            ),
        )
        self.add_stage("decoding_stage", DecodingStage(vae=self.get_module("vae")))


EntryClass = WanDMDPipeline
