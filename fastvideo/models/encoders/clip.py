"""CLIP text and vision encoders, loaded through transformers."""

from transformers import CLIPTextModel, CLIPVisionModel, CLIPVisionModelWithProjection

__all__ = ["CLIPTextModel", "CLIPVisionModel", "CLIPVisionModelWithProjection"]
