"""Prompt embeddings kept for the next videos of the same text: an LRU bounded by bytes.

A batch renders each prompt with several seeds; the text encoder's output depends on the
text and the model only, so the worker encodes a text once and hands the embedding to
``VideoGenerator.generate_video(prompt_embeds=..., negative_prompt_embeds=...)`` for the
other seeds (the engine then skips the text encoder; the videos are bit-identical).

Entries are per text, not per (prompt, negative prompt) pair: the engine encodes the prompt
and the negative prompt in separate passes, so a negative prompt shared by a whole batch is
encoded once, whatever the prompts. The key names everything else that changes an
embedding: the model, its revision (``model_revision``: the folder's configs), how it is run
(GPUs and ``pipeline_options``: precision, tensor parallelism), which role the text plays
and the tokenizer's sequence length.

The tensors are kept on the CPU, where they cost no GPU memory: an embedding is small (Wan's
UMT5 gives 512 x 4096 values, 4 MiB in bf16), so moving it to the GPU for a render takes well
under a millisecond, while a cache on the GPU would compete with the DiT and the VAE for the
memory a large render needs. With multi-GPU models the embeddings come back from the ranks
on the CPU anyway. ``embedding_cache_bytes`` (``FVB_EMBEDDING_CACHE_BYTES``) bounds the sum
of the entries' tensor bytes; 0 turns the cache off (every video encodes its texts).

Used from one thread (the one running jobs), so it needs no lock.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

PROMPT, NEGATIVE = "prompt", "negative"


@dataclass(frozen=True)
class EmbeddingKey:
    model: str
    #: ``worker.pipeline_cache.model_revision`` of the model folder.
    revision: str
    #: How the model is run: its GPU count, pipeline options and the worker's device.
    engine: str
    #: ``PROMPT`` or ``NEGATIVE`` (None as a negative prompt means the engine's default).
    role: str
    text: str | None
    max_sequence_length: int


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class EmbeddingCache:
    """At most ``max_bytes`` of embeddings; the least recently used ones go first."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"embedding cache bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[EmbeddingKey, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: EmbeddingKey) -> bool:
        return key in self._entries

    def get(self, key: EmbeddingKey) -> torch.Tensor | None:
        """The embedding (a CPU tensor), counted as a hit, or None, counted as a miss."""
        tensor = self._entries.get(key)
        if tensor is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return tensor

    def put(self, key: EmbeddingKey, tensor: torch.Tensor) -> None:
        """Keep a CPU copy of ``tensor``, evicting the least recently used entries until it
        fits; one larger than the whole bound is not kept."""
        size = tensor_bytes(tensor)
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= tensor_bytes(old)
        while self._entries and self.bytes + size > self.max_bytes:
            evicted_key, evicted = self._entries.popitem(last=False)
            self.bytes -= tensor_bytes(evicted)
            self.evictions += 1
            log.debug("prompt embedding evicted: %s %r", evicted_key.role, evicted_key.text)
        self._entries[key] = tensor.detach().to("cpu", copy=True)
        self.bytes += size

    def counters(self) -> str:
        return (
            f"hits={self.hits} misses={self.misses} entries={len(self)} bytes={self.bytes} "
            f"evictions={self.evictions}"
        )
