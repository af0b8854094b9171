"""Wan2.2's two experts (T2V-A14B style: ``transformer_2`` and ``boundary_ratio`` in
``model_index.json``, two guidance scales) against diffusers' ``WanPipeline`` on the same tiny
checkpoint, same seed, fp32 on CPU; and which expert runs at which step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastvideo import VideoGenerator
from fastvideo.testing.tiny_wan import TinyWanConfig, save_tiny_wan

PROMPT = "a cat and a dog baking a cake together in a kitchen"
NEGATIVE = "blurry, static"
REQUEST = dict(height=32, width=48, num_frames=9, num_inference_steps=4)


@pytest.fixture(scope="module")
def two_experts(tmp_path_factory):
    return save_tiny_wan(tmp_path_factory.mktemp("wan22") / "model",
                         TinyWanConfig(boundary_ratio=0.8), seed=5)  # fmt: skip


def diffusers_frames(folder, **kwargs) -> np.ndarray:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(7)
    return pipe(generator=generator, output_type="np", **kwargs).frames[0]


@pytest.mark.parametrize(
    ("guidance", "guidance_2"), [(5.0, 2.0), (4.0, None), (1.0, None)], ids=["two", "one", "off"]
)
def test_two_experts_match_diffusers(two_experts, guidance, guidance_2):
    request = dict(REQUEST, guidance_scale=guidance)
    if guidance_2 is not None:
        request["guidance_scale_2"] = guidance_2
    with VideoGenerator.from_pretrained(two_experts, device="cpu") as generator:
        ours = generator.generate_video(PROMPT, negative_prompt=NEGATIVE, seed=7, **request)
    theirs = diffusers_frames(two_experts, prompt=PROMPT, negative_prompt=NEGATIVE, **request)
    assert ours.frames.shape == theirs.shape and theirs.std() > 1e-3
    assert np.abs(ours.frames - theirs).max() <= 1e-4


def test_each_expert_runs_on_its_side_of_the_boundary(two_experts):
    with VideoGenerator.from_pretrained(two_experts, device="cpu") as generator:
        pipeline = generator.pipeline
        stage = pipeline.denoising_stage
        calls: dict[str, list[float]] = {"transformer": [], "transformer_2": []}
        for name in calls:
            pipeline.get_module(name).register_forward_hook(
                lambda module, args, kwargs, out, name=name: calls[name].append(
                    float(kwargs["timestep"][0])
                ),
                with_kwargs=True,
            )
        generator.generate_video(PROMPT, seed=1, guidance_scale=3.0, **REQUEST)
    boundary = 0.8 * stage.scheduler.config.num_train_timesteps
    # Two forwards per step under guidance, each at its step's timestep.
    assert calls["transformer"] and calls["transformer_2"]
    assert all(t >= boundary for t in calls["transformer"])
    assert all(t < boundary for t in calls["transformer_2"])
    assert len(calls["transformer"]) + len(calls["transformer_2"]) == 2 * 4


def test_the_second_scale_is_refused_for_one_expert_and_checked(tiny_t2v, two_experts):
    one = VideoGenerator.from_pretrained(tiny_t2v, device="cpu")
    two = VideoGenerator.from_pretrained(two_experts, device="cpu")
    try:
        with pytest.raises(ValueError, match="guidance_scale_2 applies only to a model with two"):
            one.generate_video(PROMPT, guidance_scale_2=2.0, **REQUEST)
        with pytest.raises(ValueError, match="guidance_scale_2 must be a number >= 0"):
            two.generate_video(PROMPT, guidance_scale_2=-1.0, **REQUEST)
    finally:
        one.close()
        two.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "engine", [dict(num_gpus=2), dict(num_gpus=2, cfg_parallel=True)], ids=["sp2", "cfg2"]
)
def test_two_experts_on_two_ranks_match_one_process(two_experts, engine):
    # 48x80 at 9 frames: 45 latent tokens, an uneven split over 2 ranks.
    request = dict(REQUEST, height=48, width=80, guidance_scale=5.0, guidance_scale_2=2.5)
    with VideoGenerator.from_pretrained(two_experts, device="cpu") as single:
        expected = single.generate_video(PROMPT, negative_prompt=NEGATIVE, seed=3, **request)
    with VideoGenerator.from_pretrained(
        two_experts, device="cpu", dist_timeout_s=60, **engine
    ) as generator:
        frames = generator.generate_video(PROMPT, negative_prompt=NEGATIVE, seed=3, **request)
    assert expected.frames.std() > 1e-3
    assert np.abs(frames.frames - expected.frames).max() <= 1e-5
