"""T5-family text encoders: UMT5 (the Wan pipelines run UMT5-XXL) is our native tensor-parallel
port; plain T5 is still loaded through transformers."""

from transformers import T5EncoderModel

from fastvideo.models.encoders.umt5 import UMT5EncoderModel

__all__ = ["T5EncoderModel", "UMT5EncoderModel"]
