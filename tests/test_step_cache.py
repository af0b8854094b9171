"""TeaCache-style step caching (``fastvideo/models/dits/step_cache.py``): off and threshold 0
change nothing, a large threshold skips, branches and requests keep their own state, and
sequence-parallel ranks take the single process's decisions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastvideo import VideoGenerator
from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.models.dits.step_cache import StepCache
from fastvideo.models.dits.wanvideo import WanTransformer3DModel
from fastvideo.testing.distributed import run_on_ranks

PROMPT = "a cat and a dog baking a cake together in a kitchen"
NEGATIVE = "blurry, low quality"
STEPS = 8
REQUEST = dict(
    negative_prompt=NEGATIVE,
    height=32,
    width=32,
    num_frames=5,
    num_inference_steps=STEPS,
    guidance_scale=5.0,
    seed=7,
)
DIT_CONFIG = dict(
    in_channels=4,
    out_channels=4,
    freq_dim=16,
    rope_max_seq_len=64,
    num_attention_heads=2,
    attention_head_dim=8,
    text_dim=24,
    ffn_dim=40,
    num_layers=2,
)
# (T, H, W) latent -> 35 tokens: odd, so SP rank 1 of 2 carries a padding token.
LATENT = (1, 10, 14)
# Accumulated relative change, in the synthetic loop below, that skips some steps only.
MIXED_THRESHOLD = 0.15


def _generate(folder: str, threshold: float | None):
    generator = VideoGenerator.from_pretrained(folder, device="cpu", step_cache_threshold=threshold)
    frames = generator.generate_video(PROMPT, **REQUEST).frames
    return generator, frames


def _stage(generator: VideoGenerator):
    return generator.pipeline.denoising_stage


def test_threshold_none_or_zero_gives_the_uncached_video_bit_for_bit(tiny_t2v):
    off, frames_off = _generate(tiny_t2v, None)
    zero, frames_zero = _generate(tiny_t2v, 0.0)
    assert _stage(off).step_cache is None
    assert np.array_equal(frames_off, frames_zero)
    assert _stage(zero).step_cache.counters == {
        "cond": {"computed": STEPS, "skipped": 0},
        "uncond": {"computed": STEPS, "skipped": 0},
    }


def test_large_threshold_skips_all_but_first_and_last_step_and_stays_finite(tiny_t2v):
    _, frames_off = _generate(tiny_t2v, None)
    cached, frames = _generate(tiny_t2v, 1e6)
    assert _stage(cached).step_cache.counters == {
        "cond": {"computed": 2, "skipped": STEPS - 2},
        "uncond": {"computed": 2, "skipped": STEPS - 2},
    }
    assert np.isfinite(frames).all()
    assert not np.array_equal(frames, frames_off)


def test_same_request_twice_gives_same_video_and_counters(tiny_t2v):
    generator = VideoGenerator.from_pretrained(tiny_t2v, device="cpu", step_cache_threshold=0.3)
    first = generator.generate_video(PROMPT, **REQUEST).frames
    first_counters = _stage(generator).step_cache.counters
    second = generator.generate_video(PROMPT, **REQUEST).frames
    assert _stage(generator).step_cache.counters == first_counters
    assert np.array_equal(first, second)
    assert first_counters["cond"]["computed"] + first_counters["cond"]["skipped"] == STEPS


def _dit() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(**DIT_CONFIG).eval()


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, *LATENT, generator=gen)
    text = torch.randn(1, 7, DIT_CONFIG["text_dim"], generator=gen)
    negative = torch.randn(1, 7, DIT_CONFIG["text_dim"], generator=gen)
    return latents, text, negative


def test_cond_and_uncond_branches_reuse_their_own_residuals():
    model = _dit()
    latents, text, negative = _inputs()
    t = torch.tensor([500.0])
    cache = StepCache(threshold=1.0, num_steps=3)
    outputs = []
    with torch.no_grad():
        for step in (0, 1):  # the same input twice: step 1 changes by 0 and is skipped
            cache.begin_step(step)
            cond = model(latents, t, text, step_cache=cache.branch("cond"))
            uncond = model(latents, t, negative, step_cache=cache.branch("uncond"))
            outputs.append((cond, uncond))
    (cond0, uncond0), (cond1, uncond1) = outputs
    assert (cond0 - uncond0).abs().max() > 1e-3  # the branches really differ
    # One shared state would hand the skipped cond pass the uncond residual.
    torch.testing.assert_close(cond1, cond0, rtol=0, atol=1e-6)
    torch.testing.assert_close(uncond1, uncond0, rtol=0, atol=1e-6)
    assert cache.counters == {
        "cond": {"computed": 1, "skipped": 1},
        "uncond": {"computed": 1, "skipped": 1},
    }


def cached_denoise(
    config: dict, state_dict: dict, inputs: tuple, threshold: float, steps: int
) -> tuple[torch.Tensor, list[bool]]:
    """A plain Euler loop over the DiT with a step cache (run on every SP rank, or alone):
    the final latents and, per step, whether the cond branch skipped the blocks."""
    model = WanTransformer3DModel(**config).eval()
    model.load_state_dict(state_dict)
    latents, text, _ = inputs
    cache = StepCache(threshold, steps)
    skipped = []
    with torch.no_grad():
        for index, t in enumerate(torch.linspace(1000.0, 50.0, steps)):
            cache.begin_step(index)
            before = cache.skipped
            pred = model(latents, t.reshape(1), text, step_cache=cache.branch("cond"))
            skipped.append(cache.skipped > before)
            latents = latents - pred / steps
    return latents, skipped


def test_sequence_parallel_ranks_take_the_single_process_decisions():
    model = _dit()
    args = (DIT_CONFIG, model.state_dict(), _inputs(), MIXED_THRESHOLD, 10)
    single, single_skipped = cached_denoise(*args)
    assert 0 < sum(single_skipped) < len(single_skipped) - 2  # mixed decisions
    for latents, skipped in run_on_ranks(cached_denoise, world_size=2, args=args, sp_size=2):
        assert skipped == single_skipped
        torch.testing.assert_close(latents, single, rtol=0, atol=1e-5)


@pytest.mark.parametrize("threshold", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_invalid_threshold_is_rejected(threshold):
    with pytest.raises(ValueError, match="step_cache_threshold"):
        FastVideoArgs.from_kwargs("unused", step_cache_threshold=threshold)
