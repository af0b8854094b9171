"""The stages pipelines are composed of; each takes the ForwardBatch and returns it."""

from fastvideo.pipelines.stages.base import PipelineStage
from fastvideo.pipelines.stages.conditioning import ConditioningStage
from fastvideo.pipelines.stages.decoding import DecodingStage
from fastvideo.pipelines.stages.denoising import DenoisingStage
from fastvideo.pipelines.stages.image_encoding import CLIPImageEncodingStage
from fastvideo.pipelines.stages.input_validation import InputValidationStage
from fastvideo.pipelines.stages.latent_preparation import LatentPreparationStage
from fastvideo.pipelines.stages.text_encoding import (
    CLIPTextEncodingStage,
    T5TextEncodingStage,
    TextEncodingStage,
)
from fastvideo.pipelines.stages.timestep_preparation import TimestepPreparationStage

__all__ = [
    "CLIPImageEncodingStage",
    "CLIPTextEncodingStage",
    "ConditioningStage",
    "DecodingStage",
    "DenoisingStage",
    "InputValidationStage",
    "LatentPreparationStage",
    "PipelineStage",
    "T5TextEncodingStage",
    "TextEncodingStage",
    "TimestepPreparationStage",
]
