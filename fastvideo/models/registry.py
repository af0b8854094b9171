"""Which native module implements each diffusers/transformers ``_class_name``.

Each table maps a ``_class_name`` from ``model_index.json`` or a component's ``config.json``
to ``(component folder under fastvideo/models, module, class)``. A ported model is added by
one line here; the loader needs no other change.
"""

from __future__ import annotations

import importlib

_TEXT_TO_VIDEO_DIT_MODELS = {
    "WanTransformer3DModel": ("dits", "wanvideo", "WanTransformer3DModel"),
}

_IMAGE_TO_VIDEO_DIT_MODELS: dict[str, tuple[str, str, str]] = {
    # Wan2.1 image-to-video uses the same class with image_dim/added_kv_proj_dim set.
}

_VAE_MODELS = {
    "AutoencoderKLWan": ("vaes", "wanvae", "AutoencoderKLWan"),
}

_TEXT_ENCODER_MODELS = {
    "UMT5EncoderModel": ("encoders", "umt5", "UMT5EncoderModel"),
    "T5EncoderModel": ("encoders", "t5", "T5EncoderModel"),
    "CLIPTextModel": ("encoders", "clip", "CLIPTextModel"),
}

_IMAGE_ENCODER_MODELS = {
    "CLIPVisionModelWithProjection": ("encoders", "clip", "CLIPVisionModelWithProjection"),
    "CLIPVisionModel": ("encoders", "clip", "CLIPVisionModel"),
}

_SCHEDULERS = {
    "UniPCMultistepScheduler": ("schedulers", "diffusers_schedulers", "UniPCMultistepScheduler"),
    "FlowMatchEulerDiscreteScheduler": (
        "schedulers",
        "diffusers_schedulers",
        "FlowMatchEulerDiscreteScheduler",
    ),
}

_MODEL_TABLES = {
    "dit": {**_TEXT_TO_VIDEO_DIT_MODELS, **_IMAGE_TO_VIDEO_DIT_MODELS},
    "vae": _VAE_MODELS,
    "text_encoder": _TEXT_ENCODER_MODELS,
    "image_encoder": _IMAGE_ENCODER_MODELS,
    "scheduler": _SCHEDULERS,
}


def supported_class_names() -> list[str]:
    return sorted(name for table in _MODEL_TABLES.values() for name in table)


def resolve_model_class(class_name: str) -> type | None:
    """The class registered for ``class_name``, or ``None`` if no table has it."""
    for table in _MODEL_TABLES.values():
        if class_name in table:
            folder, module, attr = table[class_name]
            return getattr(importlib.import_module(f"fastvideo.models.{folder}.{module}"), attr)
    return None
