"""T5-family text encoders, loaded through transformers (the Wan pipelines run UMT5-XXL)."""

from transformers import T5EncoderModel, UMT5EncoderModel

__all__ = ["T5EncoderModel", "UMT5EncoderModel"]
