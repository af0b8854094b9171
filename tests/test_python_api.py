"""The Python API as diffusers users know it: ``from_pretrained(torch_dtype=...)``,
``generate_video(generator=..., num_videos_per_prompt=..., output_type=...)`` on a list of
prompts, and a progress bar; checked against diffusers' ``WanPipeline`` on the same tiny
checkpoint (fp32, CPU, within the parity tests' tolerance)."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from PIL import Image

from fastvideo import GenerationResult, VideoGenerator
from fastvideo.fastvideo_args import PRECISIONS
from fastvideo.utils.torch_utils import module_dtype

PROMPT = "a cat and a dog baking a cake together in a kitchen"
OTHER = "a red panda eating bamboo in the snow, cinematic lighting"
NEGATIVE = "blurry, static"
FRAMES, HEIGHT, WIDTH, STEPS = 9, 32, 48, 2
SMALL = dict(height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=STEPS)
#: The parity tests' bound (tests/test_pipeline_parity.py).
TOLERANCE = 1e-4
PRECISION_FIELDS = (
    "dit_precision",
    "vae_precision",
    "text_encoder_precision",
    "image_encoder_precision",
)


@pytest.fixture(scope="module")
def t2v(tiny_t2v) -> VideoGenerator:
    return VideoGenerator.from_pretrained(tiny_t2v, device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_t2v):
    """diffusers' WanPipeline on the same folder, fp32 on CPU."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_t2v, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _seeded(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _max_diff(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, dtype=np.float32), np.asarray(theirs, dtype=np.float32)
    assert ours.shape == theirs.shape
    assert theirs.std() > 1e-3  # a real video, not a constant that would match trivially
    return float(np.abs(ours - theirs).max())


# --- from_pretrained(torch_dtype=...) --------------------------------------------------------


@pytest.mark.parametrize(
    ("torch_dtype", "precision"),
    [
        (torch.bfloat16, "bf16"),
        (torch.float16, "fp16"),
        (torch.float32, "fp32"),
        ("bfloat16", "bf16"),
        ("torch.float16", "fp16"),
    ],
)
def test_torch_dtype_sets_every_component_precision(tiny_t2v, torch_dtype, precision):
    generator = VideoGenerator.from_pretrained(tiny_t2v, device="cpu", torch_dtype=torch_dtype)
    args = generator.fastvideo_args
    assert [getattr(args, name) for name in PRECISION_FIELDS] == [precision] * 4
    # The modules are loaded in it (on CPU, where the default would be fp32 for all).
    for component in ("transformer", "vae", "text_encoder"):
        assert module_dtype(generator.pipeline.get_module(component)) == PRECISIONS[precision]


def test_torch_dtype_leaves_explicit_precisions_alone(tiny_t2v):
    generator = VideoGenerator.from_pretrained(
        tiny_t2v, device="cpu", torch_dtype=torch.bfloat16, vae_precision="fp32"
    )
    args = generator.fastvideo_args
    assert (args.dit_precision, args.text_encoder_precision, args.vae_precision) == (
        "bf16",
        "bf16",
        "fp32",
    )
    assert module_dtype(generator.pipeline.get_module("vae")) == torch.float32
    assert module_dtype(generator.pipeline.get_module("transformer")) == torch.bfloat16


@pytest.mark.parametrize("bad", [torch.int8, torch.float64, "int8", "half", 16])
def test_torch_dtype_other_value_is_a_value_error_naming_it(tiny_t2v, bad):
    with pytest.raises(
        ValueError, match=r"torch_dtype=.* is not supported; use torch\.float32, torch\.bfloat16"
    ):
        VideoGenerator.from_pretrained(tiny_t2v, device="cpu", torch_dtype=bad)


def test_dtype_is_diffusers_newer_name_for_torch_dtype(tiny_t2v):
    """diffusers 0.42 deprecates ``torch_dtype=`` for ``dtype=``: both work here, not together."""
    generator = VideoGenerator.from_pretrained(tiny_t2v, device="cpu", dtype=torch.bfloat16)
    assert generator.fastvideo_args.dit_precision == "bf16"
    with pytest.raises(ValueError, match=r"dtype=torch\.int8 is not supported"):
        VideoGenerator.from_pretrained(tiny_t2v, device="cpu", dtype=torch.int8)
    with pytest.raises(ValueError, match=r"torch_dtype= or dtype="):
        VideoGenerator.from_pretrained(
            tiny_t2v, device="cpu", dtype=torch.bfloat16, torch_dtype=torch.bfloat16
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_device_cuda_without_a_gpu_is_a_value_error_naming_device(tiny_t2v):
    with pytest.raises(
        ValueError,
        match=r"^device='cuda': no CUDA GPU is visible \(torch\.cuda\.is_available\(\) is "
        r"False\); use device='cpu'$",
    ):
        VideoGenerator.from_pretrained(tiny_t2v, device="cuda")


# --- generate_video(generator=...) -----------------------------------------------------------


def test_generator_gives_diffusers_video_and_consumes_it_alike(t2v, reference):
    """Ours and diffusers' WanPipeline, each with a generator seeded alike: the same video,
    and both generators end in the same state; the seed= path gives the very same frames."""
    ours_gen, theirs_gen = _seeded(21, 21)
    ours = t2v.generate_video(PROMPT, negative_prompt=NEGATIVE, generator=ours_gen, **SMALL)
    theirs = reference(
        prompt=PROMPT, negative_prompt=NEGATIVE, generator=theirs_gen, output_type="np", **SMALL
    ).frames[0]
    assert ours.frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert _max_diff(ours.frames, theirs) <= TOLERANCE
    assert torch.equal(ours_gen.get_state(), theirs_gen.get_state())
    # No seed reproduces a caller's generator in general: none is reported.
    assert ours.seed is None and ours.seeds == [None]
    by_seed = t2v.generate_video(PROMPT, negative_prompt=NEGATIVE, seed=21, **SMALL)
    np.testing.assert_array_equal(ours.frames, by_seed.frames)


def test_image_to_video_generator_gives_diffusers_video(tiny_i2v):
    from diffusers import WanImageToVideoPipeline

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    request = dict(prompt=PROMPT, negative_prompt=NEGATIVE, image=image, guidance_scale=4.0)
    ours_gen, theirs_gen = _seeded(11, 11)
    ours = VideoGenerator.from_pretrained(tiny_i2v, device="cpu").generate_video(
        generator=ours_gen, **request, **SMALL
    )
    # (diffusers' image-to-video pipeline fails on num_videos_per_prompt > 1 with one image:
    # it does not repeat the image embeddings; ours renders each video with the image.)
    pipe = WanImageToVideoPipeline.from_pretrained(tiny_i2v, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(generator=theirs_gen, output_type="np", **request, **SMALL).frames[0]
    assert _max_diff(ours.frames, theirs) <= TOLERANCE
    assert torch.equal(ours_gen.get_state(), theirs_gen.get_state())


@pytest.mark.parametrize("kind", ["one generator", "one per video"])
def test_prompt_list_and_num_videos_per_prompt_match_diffusers_batch(t2v, reference, kind):
    """Two prompts x 2 videos, rendered one after another here, equal diffusers' batch of 4
    (prompt 0's videos first), whether one generator draws all the noise or one per video."""
    if kind == "one generator":
        ours_gen, theirs_gen = _seeded(5)[0], _seeded(5)[0]
    else:
        ours_gen, theirs_gen = _seeded(1, 2, 3, 4), _seeded(1, 2, 3, 4)
    request = dict(
        prompt=[PROMPT, OTHER],
        negative_prompt=[NEGATIVE, "dark, noisy"],
        num_videos_per_prompt=2,
        **SMALL,
    )
    ours = t2v.generate_video(generator=ours_gen, **request)
    theirs = reference(generator=theirs_gen, output_type="np", **request).frames
    assert ours.videos.shape == theirs.shape == (4, FRAMES, HEIGHT, WIDTH, 3)
    assert ours.videos.dtype == np.float32
    assert _max_diff(ours.videos, theirs) <= TOLERANCE
    assert ours.prompts == [PROMPT, PROMPT, OTHER, OTHER]
    assert ours.seeds == [None] * 4
    # Several videos: the single-video fields stay empty rather than show only one.
    assert ours.frames is None and ours.seed is None and ours.video_path is None
    # The four videos differ (each has its own noise).
    assert (
        min(np.abs(ours.videos[i] - ours.videos[j]).max() for i in range(4) for j in range(i))
        > 1e-3
    )


def test_seed_gives_each_video_seed_plus_its_index(t2v):
    result = t2v.generate_video([PROMPT, OTHER], num_videos_per_prompt=2, seed=3, **SMALL)
    assert result.seeds == [3, 4, 5, 6]
    for index, (prompt, seed) in enumerate(zip(result.prompts, result.seeds, strict=True)):
        alone = t2v.generate_video(prompt, seed=seed, **SMALL)
        np.testing.assert_array_equal(result.videos[index], alone.frames)
    drawn = t2v.generate_video(PROMPT, num_videos_per_prompt=2, **SMALL)
    assert all(isinstance(s, int) and s >= 0 for s in drawn.seeds)
    replay = t2v.generate_video(PROMPT, seed=drawn.seeds[1], **SMALL)
    np.testing.assert_array_equal(drawn.videos[1], replay.frames)


# --- output_type -----------------------------------------------------------------------------


@pytest.mark.parametrize("output_type", ["np", "pil", "pt"])
def test_output_type_matches_diffusers_video_processor(t2v, reference, output_type):
    """The same containers, shapes, dtypes and values as diffusers returns for output_type
    (seed=s gives the i-th video the noise of torch.Generator().manual_seed(s + i))."""
    request = dict(prompt=PROMPT, num_videos_per_prompt=2, output_type=output_type, **SMALL)
    ours = t2v.generate_video(seed=8, **request).videos
    theirs = reference(generator=_seeded(8, 9), **request).frames
    assert type(ours) is type(theirs)
    if output_type == "pil":
        assert len(ours) == len(theirs) == 2
        assert all(len(video) == FRAMES for video in ours)
        assert all(isinstance(f, Image.Image) and f.mode == "RGB" for f in ours[0])
        assert ours[0][0].size == theirs[0][0].size == (WIDTH, HEIGHT)
        ours_uint8 = np.stack([np.stack([np.asarray(f) for f in v]) for v in ours])
        theirs_uint8 = np.stack([np.stack([np.asarray(f) for f in v]) for v in theirs])
        # Frames within the tolerance round to the same level, or to the next one.
        assert _max_diff(ours_uint8, theirs_uint8) <= 1
        return
    assert ours.shape == theirs.shape
    assert ours.dtype == theirs.dtype
    expected = (
        (2, FRAMES, 3, HEIGHT, WIDTH) if output_type == "pt" else (2, FRAMES, HEIGHT, WIDTH, 3)
    )
    assert tuple(ours.shape) == expected
    assert float(ours.min()) >= 0.0 and float(ours.max()) <= 1.0
    assert _max_diff(ours, theirs) <= TOLERANCE


def test_single_prompt_without_new_arguments_returns_what_it_always_has(t2v):
    result = t2v.generate_video(PROMPT, seed=2, **SMALL)
    assert isinstance(result, GenerationResult)
    assert result.frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert result.frames.dtype == np.float32
    assert result.seed == 2 and result.video_path is None
    # The plural fields hold the same single video, without a copy.
    assert result.videos.shape == (1, FRAMES, HEIGHT, WIDTH, 3)
    assert np.shares_memory(result.videos, result.frames)
    assert (result.seeds, result.prompts, result.video_paths) == ([2], [PROMPT], [])


def test_several_videos_with_output_path_write_stem_index_files(t2v, tmp_path):
    output = tmp_path / "clips" / "clip.mp4"
    result = t2v.generate_video(
        [PROMPT, OTHER], seed=1, fps=8, output_path=output, return_frames=False, **SMALL
    )
    assert result.video_paths == [output.with_name("clip-0.mp4"), output.with_name("clip-1.mp4")]
    assert not output.exists() and result.video_path is None
    assert result.videos is None and result.frames is None
    for path in result.video_paths:
        with av.open(str(path)) as container:
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert np.stack(decoded).shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert "mp4_encode" in result.stage_timings


# --- bad values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"output_type": "latent"}, r"output_type must be one of \['np', 'pil', 'pt'\]"),
        ({"num_videos_per_prompt": 0}, r"num_videos_per_prompt must be a positive integer"),
        ({"num_videos_per_prompt": 1.5}, r"num_videos_per_prompt must be a positive integer"),
        (
            {"prompt": [PROMPT, OTHER], "negative_prompt": [NEGATIVE]},
            r"negative_prompt must be a string or a list of 2 string\(s\)",
        ),
        (
            {"prompt": [PROMPT, OTHER], "generator": _seeded(1)},
            r"generator is a list of 1; it needs one torch.Generator per video: 2",
        ),
        (
            {"num_videos_per_prompt": 3, "generator": _seeded(1, 2)},
            r"generator is a list of 2; .* 3",
        ),
        ({"generator": 7}, r"generator must be a torch.Generator"),
        ({"generator": _seeded(1)[0], "seed": 1}, r"pass seed= or generator=, not both"),
        ({"prompt": [PROMPT, ""]}, r"prompt must be a non-empty string"),
        ({"prompt": []}, r"prompt must be a non-empty string"),
        ({"progress": "yes"}, r"progress must be True or False"),
    ],
)
def test_bad_value_is_a_value_error_naming_the_argument(t2v, kwargs, message):
    calls = []
    request = {"prompt": PROMPT, **SMALL, **kwargs}
    with pytest.raises(ValueError, match=message):
        t2v.generate_video(callback=calls.append, **request)
    assert calls == []


def test_bad_request_with_a_generator_leaves_the_generator_untouched(t2v):
    generator = _seeded(4)[0]
    before = generator.get_state()
    with pytest.raises(ValueError, match=r"height=30"):
        t2v.generate_video([PROMPT, OTHER], generator=generator, **{**SMALL, "height": 30})
    assert torch.equal(generator.get_state(), before)


# --- progress bar ----------------------------------------------------------------------------


def test_progress_bar_is_on_by_default_and_off_with_progress_false(t2v, capsys):
    seen = []
    t2v.generate_video(PROMPT, seed=1, callback=seen.append, **SMALL)
    err = capsys.readouterr().err
    assert "denoising" in err and f"{STEPS}/{STEPS}" in err
    assert [p.step for p in seen] == [1, 2]  # the caller's callback still runs
    t2v.generate_video([PROMPT, OTHER], seed=1, **SMALL)
    err = capsys.readouterr().err
    assert "denoising video 2/2" in err and f"{2 * STEPS}/{2 * STEPS}" in err
    t2v.generate_video(PROMPT, seed=1, progress=False, **SMALL)
    assert "denoising" not in capsys.readouterr().err


# --- several ranks ---------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_multi_rank_generator_takes_a_generator_and_shows_progress(tiny_t2v, t2v, capsys):
    """With num_gpus=2 (CPU ranks over gloo) the caller draws the noise from its generator and
    sends it to the ranks: the single-process videos, the generator consumed alike, and the
    progress bar drawn here, in the caller."""
    request = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_videos_per_prompt=2, **SMALL)
    single_gen, ranks_gen = _seeded(13, 13)
    expected = t2v.generate_video(generator=single_gen, progress=False, **request).videos
    capsys.readouterr()
    with VideoGenerator.from_pretrained(
        tiny_t2v, num_gpus=2, device="cpu", dist_timeout_s=60
    ) as sp2:
        result = sp2.generate_video(generator=ranks_gen, **request)
        seeded = sp2.generate_video(seed=13, progress=False, **request)
    assert _max_diff(result.videos, expected) <= 1e-5
    assert torch.equal(ranks_gen.get_state(), single_gen.get_state())
    assert result.seeds == [None, None] and seeded.seeds == [13, 14]
    err = capsys.readouterr().err
    assert f"{2 * STEPS}/{2 * STEPS}" in err
