"""Prompt -> text-encoder hidden states (and the negative prompt's, for guidance)."""

from __future__ import annotations

import html
import re

import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.pipelines.pipeline_batch_info import ForwardBatch
from fastvideo.pipelines.stages.base import PipelineStage
from fastvideo.utils.torch_utils import module_device

try:
    import ftfy
except ImportError:  # optional, as in diffusers
    ftfy = None


def clean_prompt(text: str) -> str:
    """The prompt normalisation Wan was trained with (html entities, mojibake, spaces)."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncodingStage(PipelineStage):
    """Tokenise to a fixed length and keep the encoder's last hidden state.

    Embeddings the request brings (``batch.prompt_embeds``, ``batch.negative_prompt_embeds``,
    as diffusers' ``prompt_embeds=``/``negative_prompt_embeds=``) are used as they are, moved
    to the text encoder's device, and their text is not encoded: a caller that keeps the
    embeddings of a prompt renders its other seeds without running the text encoder. Each
    text is encoded on its own (the prompt and the negative prompt in separate passes), so
    an embedding depends on its text alone.
    """

    def __init__(self, text_encoder, tokenizer) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer

    def max_length(self, batch: ForwardBatch) -> int:
        return min(self.tokenizer.model_max_length, batch.max_sequence_length)

    def prepare_prompt(self, prompt: str) -> str:
        return prompt

    def finish_embeddings(
        self, hidden: torch.Tensor, mask: torch.Tensor, max_length: int
    ) -> torch.Tensor:
        return hidden

    def encode(self, prompts: list[str], batch: ForwardBatch) -> torch.Tensor:
        max_length = self.max_length(batch)
        tokens = self.tokenizer(
            [self.prepare_prompt(p) for p in prompts],
            padding="max_length",
            max_length=max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = module_device(self.text_encoder)
        mask = tokens.attention_mask.to(device)
        hidden = self.text_encoder(tokens.input_ids.to(device), mask).last_hidden_state
        return self.finish_embeddings(hidden, mask, max_length)

    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        device = module_device(self.text_encoder)
        if batch.prompt_embeds is not None:
            batch.prompt_embeds = batch.prompt_embeds.to(device)
            count = batch.prompt_embeds.shape[0]
        else:
            prompts = batch.prompt if isinstance(batch.prompt, list) else [batch.prompt]
            batch.prompt_embeds = self.encode(prompts, batch)
            count = len(prompts)
        if not batch.do_classifier_free_guidance:
            return batch
        if batch.negative_prompt_embeds is not None:
            batch.negative_prompt_embeds = batch.negative_prompt_embeds.to(device)
        else:
            # No negative prompt: the empty one, as diffusers' Wan pipelines encode it.
            negative = batch.negative_prompt or ""
            negatives = negative if isinstance(negative, list) else [negative] * count
            batch.negative_prompt_embeds = self.encode(negatives, batch)
        return batch


class CLIPTextEncodingStage(TextEncodingStage):
    """CLIP-style text encoding: every position of the padded sequence is kept."""


class T5TextEncodingStage(TextEncodingStage):
    """T5/UMT5 encoding as Wan uses it: cleaned prompt, and the positions after each
    prompt's last token zeroed, so padding carries no signal into cross-attention."""

    def prepare_prompt(self, prompt: str) -> str:
        return clean_prompt(prompt)

    def finish_embeddings(
        self, hidden: torch.Tensor, mask: torch.Tensor, max_length: int
    ) -> torch.Tensor:
        lengths = mask.gt(0).sum(dim=1)
        keep = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]
        return hidden * keep[..., None].to(hidden.dtype)
