"""FastVideo engine: diffusers-format video diffusion models as composable, parallel pipelines.

``fastvideo`` never imports the service packages (``scheduler``, ``worker``, ``fvb_core``,
``fvb_tools``; ``tests/test_import_layers.py`` checks).
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastvideo.entrypoints.video_generator import GenerationResult, VideoGenerator

__all__ = ["GenerationResult", "VideoGenerator"]

#: Kept equal to ``[project] version`` in pyproject.toml (a test checks); ``fastvideo
#: --version`` prints the installed distribution's and falls back to this one.
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so ``import fastvideo.layers`` does not pull in diffusers and transformers.
    if name in __all__:
        from fastvideo.entrypoints import video_generator

        return getattr(video_generator, name)
    raise AttributeError(f"module 'fastvideo' has no attribute {name!r}")
