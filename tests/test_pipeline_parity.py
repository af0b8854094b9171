"""Our Wan pipelines against diffusers' on the same tiny checkpoints, same seed, fp32 on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastvideo import VideoGenerator
from fastvideo.testing.tiny_wan import TinyWanConfig, save_tiny_wan

PROMPT = "a cat and a dog baking a cake together in a kitchen"
NEGATIVE = "blurry, static"


def _diffusers_frames(pipeline_cls, folder, seed, **kwargs) -> np.ndarray:
    pipe = pipeline_cls.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(generator=generator, output_type="np", **kwargs)
    return out.frames[0]


def _test_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("config", "size", "num_frames", "steps", "guidance"),
    [
        (TinyWanConfig(), (32, 48), 9, 3, 5.0),
        # More heads and layers, the Euler scheduler, an odd latent grid, no guidance.
        (
            TinyWanConfig(
                num_attention_heads=3,
                num_layers=3,
                attention_head_dim=12,
                scheduler="flow_match_euler",
                z_dim=8,
            ),
            (48, 80),
            5,
            2,
            1.0,
        ),
    ],
)
def test_text_to_video_matches_diffusers(tmp_path, config, size, num_frames, steps, guidance):
    from diffusers import WanPipeline

    folder = save_tiny_wan(tmp_path / "model", config, seed=3)
    height, width = size
    request = dict(
        height=height,
        width=width,
        num_frames=num_frames,
        num_inference_steps=steps,
        guidance_scale=guidance,
    )
    ours = VideoGenerator.from_pretrained(folder, device="cpu").generate_video(
        PROMPT, negative_prompt=NEGATIVE, seed=7, **request
    )
    theirs = _diffusers_frames(
        WanPipeline, folder, 7, prompt=PROMPT, negative_prompt=NEGATIVE, **request
    )
    assert ours.frames.shape == theirs.shape == (num_frames, height, width, 3)
    assert ours.frames.dtype == np.float32
    assert theirs.std() > 1e-3  # a real video, not a constant that would match trivially
    assert np.abs(ours.frames - theirs).max() <= 1e-4


def test_image_to_video_matches_diffusers(tiny_i2v):
    from diffusers import WanImageToVideoPipeline

    request = dict(height=32, width=48, num_frames=9, num_inference_steps=3, guidance_scale=4.0)
    image = _test_image()
    ours = VideoGenerator.from_pretrained(tiny_i2v, device="cpu").generate_video(
        PROMPT, negative_prompt=NEGATIVE, image=image, seed=11, **request
    )
    theirs = _diffusers_frames(
        WanImageToVideoPipeline,
        tiny_i2v,
        11,
        image=image,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        **request,
    )
    assert ours.frames.shape == theirs.shape == (9, 32, 48, 3)
    assert theirs.std() > 1e-3
    assert np.abs(ours.frames - theirs).max() <= 1e-4


def test_same_seed_same_video_and_other_seed_differs(tiny_t2v):
    generator = VideoGenerator.from_pretrained(tiny_t2v, device="cpu")
    request = dict(height=32, width=32, num_frames=5, num_inference_steps=2)
    first = generator.generate_video(PROMPT, seed=1, **request).frames
    again = generator.generate_video(PROMPT, seed=1, **request).frames
    other = generator.generate_video(PROMPT, seed=2, **request).frames
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3
