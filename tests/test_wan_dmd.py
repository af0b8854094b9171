"""The few-step DMD pipeline (``WanDMDPipeline``, FastWan-style) against a reference loop
written here from diffusers' components (``FlowMatchEulerDiscreteScheduler`` for the training
sigmas, ``WanTransformer3DModel``, the VAE): the same seed gives the same video, and the DiT
runs once per step (no guidance branch)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastvideo import VideoGenerator
from fastvideo.testing.tiny_wan import TinyWanConfig, save_tiny_wan

PROMPT = "a red panda eating bamboo in the snow"
SIZE = dict(height=32, width=48, num_frames=9)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_wan(tmp_path_factory.mktemp("dmd") / "model",
                         TinyWanConfig(scheduler="flow_match_euler"), seed=9)  # fmt: skip


def reference_frames(folder, steps, seed: int) -> np.ndarray:
    """DMD sampling by hand: x0 from the flow prediction, renoised with fresh noise."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    from diffusers.utils.torch_utils import randn_tensor

    pipe = WanPipeline.from_pretrained(folder, dtype=torch.float32)
    embeds, _ = pipe.encode_prompt(
        PROMPT, do_classifier_free_guidance=False, max_sequence_length=512, device="cpu"
    )
    vae = pipe.vae
    z, scale = vae.config.z_dim, vae.config.scale_factor_spatial
    frames = (SIZE["num_frames"] - 1) // vae.config.scale_factor_temporal + 1
    shape = (1, z, frames, SIZE["height"] // scale, SIZE["width"] // scale)
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = randn_tensor(shape, generator=generator, dtype=torch.float32)
    schedule = FlowMatchEulerDiscreteScheduler(shift=pipe.scheduler.config.shift)

    def sigma(t):
        return schedule.sigmas[torch.argmin((schedule.timesteps - t).abs())].double()

    with torch.no_grad():
        for i, t in enumerate(steps):
            flow = pipe.transformer(hidden_states=latents, timestep=torch.tensor([float(t)]),
                                    encoder_hidden_states=embeds, return_dict=False)[0]  # fmt: skip
            clean = latents.double() - sigma(t) * flow.double()
            if i + 1 < len(steps):
                noise = randn_tensor(shape, generator=generator, dtype=torch.float32).double()
                latents = ((1 - sigma(steps[i + 1])) * clean + sigma(steps[i + 1]) * noise).float()
            else:
                latents = clean.float()
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1)
        video = vae.decode(latents * std + mean, return_dict=False)[0]
    return pipe.video_processor.postprocess_video(video, output_type="np")[0]


def test_dmd_matches_the_reference_loop_and_runs_the_dit_once_a_step(folder):
    generator = VideoGenerator.from_pretrained(
        folder, device="cpu", pipeline_class_name="WanDMDPipeline"
    )
    try:
        forwards = []
        dit = generator.pipeline.get_module("transformer")
        dit.register_forward_hook(lambda *args: forwards.append(1))
        steps_seen = []
        ours = generator.generate_video(
            PROMPT, seed=5, guidance_scale=5.0, callback=lambda p: steps_seen.append(p.step), **SIZE
        )
    finally:
        generator.close()
    assert len(forwards) == 3 and steps_seen == [1, 2, 3]  # no unconditional branch
    theirs = reference_frames(folder, (1000, 757, 522), seed=5)
    assert ours.frames.shape == theirs.shape and theirs.std() > 1e-3
    assert np.abs(ours.frames - theirs).max() <= 1e-4


def test_the_model_folder_selects_dmd_and_its_steps(folder, tmp_path):
    import shutil

    copy = tmp_path / "fastwan"
    shutil.copytree(folder, copy)
    index_path = copy / "model_index.json"
    index = json.loads(index_path.read_text())
    index.update(_class_name="WanDMDPipeline", dmd_denoising_steps=[1000, 500])
    index_path.write_text(json.dumps(index))
    with VideoGenerator.from_pretrained(copy, device="cpu") as generator:
        assert type(generator.pipeline).__name__ == "WanDMDPipeline"
        ours = generator.generate_video(PROMPT, seed=2, **SIZE)
    theirs = reference_frames(folder, (1000, 500), seed=2)
    assert np.abs(ours.frames - theirs).max() <= 1e-4


@pytest.mark.timeout(300)
def test_dmd_on_two_ranks_equals_one_process(folder):
    request = dict(height=48, width=80, num_frames=9)  # 45 tokens: an uneven split
    engine = dict(device="cpu", pipeline_class_name="WanDMDPipeline")
    with VideoGenerator.from_pretrained(folder, **engine) as single:
        expected = single.generate_video(PROMPT, seed=4, **request).frames
    with VideoGenerator.from_pretrained(folder, num_gpus=2, dist_timeout_s=60, **engine) as sp2:
        frames = sp2.generate_video(PROMPT, seed=4, **request).frames
    assert expected.std() > 1e-3 and np.abs(frames - expected).max() <= 1e-5


def test_four_step_sampling_without_guidance_runs_no_second_forward(folder):
    # A step-distilled model sampled with the ordinary scheduler loop (flow-match Euler with
    # its shift): guidance_scale=1 skips the unconditional branch, not just its weight.
    with VideoGenerator.from_pretrained(folder, device="cpu") as generator:
        forwards = []
        generator.pipeline.get_module("transformer").register_forward_hook(
            lambda *args: forwards.append(1)
        )
        generator.generate_video(PROMPT, seed=1, num_inference_steps=4, guidance_scale=1.0, **SIZE)
        assert len(forwards) == 4
        generator.generate_video(PROMPT, seed=1, num_inference_steps=4, guidance_scale=3.0, **SIZE)
        assert len(forwards) == 4 + 8
