"""Prompt-embedding reuse in the worker (``worker/embedding_cache.py``): a text is encoded
once per worker and model, and its other videos reuse the embedding; the videos are the same
as without the cache. Counted on the text encoder itself (a forward hook on the loaded
module), through ``JobRunner.run``, the Celery task's code path (``worker_inprocess``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.embedding_cache import NEGATIVE, PROMPT, EmbeddingCache, EmbeddingKey

pytestmark = pytest.mark.timeout(240)

PROMPTS = ("a cat and a dog baking a cake", "waves crash on a rocky shore")
GUIDED = dict(guidance_scale=5.0, negative_prompt="blurry, static")


def test_two_prompts_by_four_seeds_run_the_text_encoder_twice(in_process):
    runner = in_process.runner()
    engine = in_process.watch(runner, "tiny")
    ids = [in_process.submit(prompt=p, seed=seed) for p in PROMPTS for seed in range(4)]
    in_process.run_all(runner, ids)
    assert engine.encoder_calls == [1, 1]  # one forward pass per prompt, one prompt each
    assert (runner.embeddings.misses, runner.embeddings.hits, len(runner.embeddings)) == (2, 6, 2)
    assert len(engine.videos) == 8

    # Without the cache, every video runs the text encoder.
    uncached = in_process.runner(embedding_cache_bytes=0)
    baseline = in_process.watch(uncached, "tiny")
    ids = [in_process.submit(prompt=p, seed=seed) for p in PROMPTS for seed in range(4)]
    in_process.run_all(uncached, ids)
    assert baseline.encoder_calls == [1] * 8
    for cached, encoded in zip(engine.videos, baseline.videos, strict=True):
        assert np.array_equal(cached, encoded)


def test_a_negative_prompt_shared_by_guided_prompts_is_encoded_once(in_process):
    runner = in_process.runner()
    engine = in_process.watch(runner, "tiny")
    ids = [in_process.submit(prompt=p, seed=s, **GUIDED) for p in PROMPTS for s in range(3)]
    in_process.run_all(runner, ids)
    # The two prompts and their shared negative prompt, each encoded in its own pass.
    assert engine.encoder_calls == [1, 1, 1]
    assert (runner.embeddings.misses, runner.embeddings.hits) == (3, 9)


def test_cached_embeddings_give_the_videos_encoding_gives(in_process):
    params = dict(prompt=PROMPTS[0], seed=11, **GUIDED)
    uncached = in_process.runner(embedding_cache_bytes=0)
    reference = in_process.watch(uncached, "tiny")
    (encoded,) = in_process.run_all(uncached, [in_process.submit(**params)])

    runner = in_process.runner()
    engine = in_process.watch(runner, "tiny")
    rows = in_process.run_all(runner, [in_process.submit(**params) for _ in range(2)])
    assert engine.encoder_calls == [1, 1]  # the first job encoded prompt and negative
    assert runner.embeddings.hits == 2  # the second reused both
    for video in engine.videos:
        assert np.array_equal(video, reference.videos[0])
    # The stored videos are byte for byte the same.
    assert {row.output_sha256 for row in rows} == {encoded.output_sha256}


def test_a_changed_negative_prompt_misses_and_changes_the_video(in_process):
    runner = in_process.runner()
    engine = in_process.watch(runner, "tiny")
    first = dict(prompt=PROMPTS[1], seed=5, **GUIDED)
    second = {**first, "negative_prompt": "low quality, watermark"}
    in_process.run_all(runner, [in_process.submit(**first), in_process.submit(**second)])
    assert engine.encoder_calls == [1, 1, 1]  # prompt, negative 1, then only negative 2
    assert (runner.embeddings.misses, runner.embeddings.hits) == (3, 1)
    assert not np.array_equal(engine.videos[0], engine.videos[1])

    uncached = in_process.runner(embedding_cache_bytes=0)
    reference = in_process.watch(uncached, "tiny")
    in_process.run_all(uncached, [in_process.submit(**second)])
    assert np.array_equal(engine.videos[1], reference.videos[0])


def test_the_byte_bound_evicts_the_least_recently_used_embedding(in_process):
    # Room for one tiny embedding (512 tokens x 32 floats): a second prompt evicts the first.
    runner = in_process.runner(embedding_cache_bytes=512 * 32 * 4)
    engine = in_process.watch(runner, "tiny")
    order = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    in_process.run_all(runner, [in_process.submit(prompt=p, seed=1) for p in order])
    assert engine.encoder_calls == [1, 1, 1]  # prompt 0, prompt 1, prompt 0 again
    assert (runner.embeddings.hits, runner.embeddings.evictions, len(runner.embeddings)) == (
        1,
        2,
        1,
    )
    assert runner.embeddings.bytes == 512 * 32 * 4


def _key(text: str, role: str = PROMPT, **fields) -> EmbeddingKey:
    values = dict(
        model="m", revision="r", engine="{}", role=role, text=text, max_sequence_length=512
    )
    return EmbeddingKey(**{**values, **fields})


def test_embedding_cache_is_an_lru_bounded_by_tensor_bytes():
    one = torch.zeros(1, 4, 8)  # 128 bytes
    cache = EmbeddingCache(max_bytes=3 * 128)
    for text in "abc":
        cache.put(_key(text), one)
    assert cache.get(_key("a")) is not None  # a is now the most recently used
    cache.put(_key("d"), one)  # over the bound: b, the least recently used, goes
    assert [_key(t) in cache for t in "abcd"] == [True, False, True, True]
    assert (cache.bytes, cache.evictions) == (3 * 128, 1)
    cache.put(_key("big"), torch.zeros(1, 4, 32))  # larger than the whole bound: not kept
    assert _key("big") not in cache and len(cache) == 3
    cache.put(_key("e"), torch.zeros(1, 4, 16))  # 256 bytes: two entries make room
    assert [_key(t) in cache for t in "acde"] == [False, False, True, True]
    assert cache.bytes == 128 + 256
    assert cache.get(_key("a")) is None
    assert (cache.hits, cache.misses) == (1, 1)


def test_embedding_cache_keeps_cpu_copies_and_keys_on_everything_that_changes_an_embedding():
    cache = EmbeddingCache(max_bytes=1 << 20)
    tensor = torch.ones(1, 4, 8, dtype=torch.bfloat16)
    cache.put(_key("a"), tensor)
    kept = cache.get(_key("a"))
    assert kept.device.type == "cpu" and kept.dtype == torch.bfloat16
    assert kept.data_ptr() != tensor.data_ptr()
    for other in (
        _key("a", role=NEGATIVE),
        _key("a", model="m2"),
        _key("a", revision="r2"),
        _key("a", engine='{"options": {"text_encoder_precision": "fp32"}}'),
        _key("a", max_sequence_length=256),
        _key("A"),
    ):
        assert cache.get(other) is None
    assert not EmbeddingCache(max_bytes=0).enabled
