"""``fastvideo generate`` and ``VideoGenerator.generate_video``: the mp4 is what was asked
for, bad input is refused with a clear message, progress callbacks report and can cancel,
and the result has the documented shape and types."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from fastvideo import VideoGenerator
from fastvideo.entrypoints.cli import main
from fastvideo.pipelines.pipeline_batch_info import GenerationCancelled, StepProgress

PROMPT = "a cat and a dog baking a cake together in a kitchen"
FRAMES, HEIGHT, WIDTH, FPS, STEPS = 9, 32, 48, 8, 2
SMALL = dict(height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=STEPS)


@pytest.fixture(scope="module")
def t2v(tiny_t2v) -> VideoGenerator:
    return VideoGenerator.from_pretrained(tiny_t2v, device="cpu")


@pytest.fixture(scope="module")
def i2v(tiny_i2v) -> VideoGenerator:
    return VideoGenerator.from_pretrained(tiny_i2v, device="cpu")


@pytest.fixture
def png(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "first_frame.png"
    Image.fromarray(rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(path)
    return path


def _cli_args(model: str, output: Path, *extra: str, **request: object) -> list[str]:
    values = {
        "height": HEIGHT,
        "width": WIDTH,
        "num-frames": FRAMES,
        "num-inference-steps": STEPS,
        "fps": FPS,
        "seed": 3,
        **{k.replace("_", "-"): v for k, v in request.items()},
    }
    args = ["generate", "--model-path", model, "--prompt", PROMPT, "--output-path", str(output)]
    args += [item for k, v in values.items() for item in (f"--{k}", str(v))]
    return [*args, "--device", "cpu", "--no-progress", *extra]


def _decode(path: Path) -> tuple[np.ndarray, str, Fraction]:
    """All frames of the mp4 as (T, H, W, 3) float in [0, 1], its codec and frame rate (read
    while the container is open: a stream's fields are not valid after it closes)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        codec, rate = stream.codec_context.name, stream.average_rate
    return np.stack(frames).astype(np.float32) / 255.0, codec, rate


def _assert_mp4(path: Path, num_frames: int, height: int, width: int, fps: int) -> np.ndarray:
    assert path.is_file()
    frames, codec, rate = _decode(path)
    assert codec == "h264"
    assert rate == fps
    assert frames.shape == (num_frames, height, width, 3)
    return frames


# --- fastvideo generate ----------------------------------------------------------------------


def test_cli_writes_h264_mp4_with_requested_frames_size_and_fps(tiny_t2v, t2v, tmp_path, capsys):
    output = tmp_path / "out" / "video.mp4"
    assert main(_cli_args(tiny_t2v, output)) == 0
    assert f"wrote {output} ({FRAMES} frames, {WIDTH}x{HEIGHT}, {FPS} fps, seed 3)" in (
        capsys.readouterr().out
    )
    decoded = _assert_mp4(output, FRAMES, HEIGHT, WIDTH, FPS)
    # The file holds the generated video, not just any frames: its luma matches up to H.264
    # loss (4:2:0 chroma subsampling blurs this noisy tiny video's colour, not its luma).
    expected = t2v.generate_video(PROMPT, seed=3, fps=FPS, **SMALL).frames
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    assert decoded.std() > 0.02
    assert np.abs(decoded @ luma - expected @ luma).mean() < 0.02


_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}


def _console_script() -> list[str]:
    script = Path(sys.executable).parent / "fastvideo"
    return (
        [str(script)] if script.is_file() else [sys.executable, "-m", "fastvideo.entrypoints.cli"]
    )


def test_cli_console_script_in_a_subprocess_writes_the_mp4(tiny_t2v, tmp_path):
    output = tmp_path / "video.mp4"
    done = subprocess.run(
        [*_console_script(), *_cli_args(tiny_t2v, output, num_frames=5, fps=12)],
        capture_output=True,
        text=True,
        env=_ENV,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout
    _assert_mp4(output, 5, HEIGHT, WIDTH, 12)


def test_cli_image_to_video_with_png(tiny_i2v, png, tmp_path):
    output = tmp_path / "i2v.mp4"
    assert main(_cli_args(tiny_i2v, output, "--image", str(png), guidance_scale=4.0)) == 0
    _assert_mp4(output, FRAMES, HEIGHT, WIDTH, FPS)


@pytest.mark.parametrize(
    ("model", "request_args", "message"),
    [
        ("tiny_t2v", {"height": 40}, r"height=40 must be a multiple of 16"),
        ("tiny_t2v", {"num_frames": 10}, r"num_frames=10 is not allowed.*4\*k\+1"),
        ("tiny_i2v", {}, r"image is required"),
        (None, {}, r"is not an existing folder"),
    ],
    ids=["height", "num_frames", "missing_image", "unknown_model"],
)
def test_cli_bad_input_exits_2_with_message_and_no_traceback(
    request, tmp_path, capsys, model, request_args, message
):
    model_path = request.getfixturevalue(model) if model else str(tmp_path / "no-such-model")
    output = tmp_path / "never.mp4"
    assert main(_cli_args(model_path, output, **request_args)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith("fastvideo: error: ")]
    assert len(error_lines) == 1, err
    assert re.search(message, error_lines[0]), error_lines[0]
    assert not output.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cli_device_cuda_without_a_gpu_prints_one_line_and_exits_2(tiny_t2v, tmp_path, device):
    output = tmp_path / "never.mp4"
    args = _cli_args(tiny_t2v, output)
    args[args.index("--device") + 1] = device
    done = subprocess.run(
        [*_console_script(), *args], capture_output=True, text=True, env=_ENV, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"fastvideo: error: --device {device}: no CUDA GPU is visible "
        "(torch.cuda.is_available() is False); use --device cpu"
    ), done.stderr
    assert not output.exists()


def test_cli_version_prints_the_package_version_and_exits_0():
    import fastvideo

    installed = importlib.metadata.version("fastvideo-batch")
    done = subprocess.run(
        [*_console_script(), "--version"], capture_output=True, text=True, env=_ENV, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"fastvideo {installed}"
    # The fallback for a source tree without installed metadata is the same version.
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert fastvideo.__version__ == pyproject["project"]["version"] == installed


def test_cli_generate_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    options = text[text.index("options:") :]
    # One block per option: "  --flag METAVAR   help ..." and its continuation lines.
    blocks = [" ".join(b.split()) for b in re.split(r"\n  (?=-)", options)[1:]]
    flags = [b.split()[0].rstrip(",") for b in blocks]
    assert "--height" in flags and "--no-progress" in flags
    for flag, block in zip(flags, blocks, strict=True):
        if flag == "-h":
            continue
        assert "(default: " in block or "(required)" in block, block
    by_flag = dict(zip(flags, blocks, strict=True))
    for flag, default in [
        ("--height", "480"),
        ("--width", "832"),
        ("--num-frames", "81"),
        ("--num-inference-steps", "50"),
        ("--guidance-scale", "5.0"),
        ("--fps", "16"),
        ("--num-gpus", "1"),
        ("--no-progress", "False"),
    ]:
        assert f"(default: {default})" in by_flag[flag], by_flag[flag]
    for flag in ("--model-path", "--prompt", "--output-path"):
        assert "(required)" in by_flag[flag]


def test_cli_shows_the_progress_bar_unless_no_progress(tiny_t2v, tmp_path, capsys):
    args = _cli_args(tiny_t2v, tmp_path / "a.mp4")
    assert main([a for a in args if a != "--no-progress"]) == 0
    assert f"{STEPS}/{STEPS}" in capsys.readouterr().err
    assert main(_cli_args(tiny_t2v, tmp_path / "b.mp4")) == 0
    assert "denoising" not in capsys.readouterr().err


# --- generate_video validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 30}, r"height=30"),
        ({"width": 50}, r"width=50"),
        ({"num_frames": 10}, r"num_frames=10"),
        ({"num_inference_steps": 0}, r"num_inference_steps must be a positive integer, got 0"),
        ({"prompt": ""}, r"prompt must be a non-empty string"),
        ({"prompt": "   "}, r"prompt must be a non-empty string"),
        ({"guidance_scale": -1.0}, r"guidance_scale must be a number >= 0, got -1\.0"),
        ({"fps": 0}, r"fps must be a positive integer"),
        ({"seed": -5}, r"seed must be a non-negative integer"),
    ],
)
def test_generate_video_rejects_bad_argument_before_denoising(t2v, kwargs, message):
    calls = []
    request = {"prompt": PROMPT, **SMALL, **kwargs}
    with pytest.raises(ValueError, match=message):
        t2v.generate_video(callback=calls.append, **request)
    assert calls == []


def test_image_to_video_requires_an_image(i2v):
    with pytest.raises(ValueError, match=r"image is required"):
        i2v.generate_video(PROMPT, **SMALL)


def test_image_path_that_does_not_exist_is_named(i2v, tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ValueError, match=rf"image='{missing}': no such file"):
        i2v.generate_video(PROMPT, image=missing, **SMALL)


def test_image_file_that_is_not_an_image_is_named(i2v, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("this is not a PNG")
    with pytest.raises(ValueError, match=rf"image='{fake}' is not a readable image"):
        i2v.generate_video(PROMPT, image=str(fake), **SMALL)


# --- step callback -----------------------------------------------------------------------


def test_callback_receives_every_step_in_order(t2v):
    steps = 4
    seen: list[StepProgress] = []
    t2v.generate_video(
        PROMPT, seed=1, callback=seen.append, **{**SMALL, "num_inference_steps": steps}
    )
    assert all(isinstance(p, StepProgress) for p in seen)
    assert [p.step for p in seen] == [1, 2, 3, 4]
    assert {p.num_steps for p in seen} == {steps}
    timesteps = [p.timestep for p in seen]
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == steps
    elapsed = [p.elapsed_s for p in seen]
    assert elapsed == sorted(elapsed) and elapsed[0] >= 0


def test_callback_returning_true_cancels_after_that_step(t2v, tmp_path):
    seen: list[int] = []

    def stop_after_two(progress: StepProgress) -> bool:
        seen.append(progress.step)
        return progress.step == 2

    output = tmp_path / "cancelled.mp4"
    with pytest.raises(GenerationCancelled, match=r"after step 2"):
        t2v.generate_video(
            PROMPT,
            seed=1,
            callback=stop_after_two,
            output_path=output,
            **{**SMALL, "num_inference_steps": 5},
        )
    assert seen == [1, 2]
    assert not output.exists()


# --- result contract -------------------------------------------------------------------------


def test_result_frames_are_float32_thwc_in_unit_range(t2v):
    result = t2v.generate_video(PROMPT, seed=2, fps=FPS, **SMALL)
    frames = result.frames
    assert frames.dtype == np.float32
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert frames.min() >= 0.0 and frames.max() <= 1.0
    assert frames.std() > 1e-3
    assert result.video_path is None
    assert (result.num_frames, result.height, result.width, result.fps, result.seed) == (
        FRAMES,
        HEIGHT,
        WIDTH,
        FPS,
        2,
    )
    assert "denoising_stage" in result.stage_timings
    assert "mp4_encode" not in result.stage_timings


def test_result_video_path_is_set_when_output_path_given(t2v, tmp_path):
    output = tmp_path / "nested" / "clip.mp4"
    result = t2v.generate_video(PROMPT, seed=2, fps=FPS, output_path=output, **SMALL)
    assert result.video_path == output
    assert "mp4_encode" in result.stage_timings
    _assert_mp4(output, FRAMES, HEIGHT, WIDTH, FPS)


def test_return_frames_false_gives_no_frames_but_keeps_metadata(t2v, tmp_path):
    output = tmp_path / "clip.mp4"
    result = t2v.generate_video(
        PROMPT, seed=2, fps=FPS, output_path=output, return_frames=False, **SMALL
    )
    assert result.frames is None
    assert result.video_path == output and output.is_file()
    assert (result.num_frames, result.height, result.width) == (FRAMES, HEIGHT, WIDTH)


def test_same_seed_gives_same_frames_and_unset_seed_is_reported(t2v):
    first = t2v.generate_video(PROMPT, seed=9, **SMALL)
    again = t2v.generate_video(PROMPT, seed=9, **SMALL)
    np.testing.assert_array_equal(first.frames, again.frames)
    drawn = t2v.generate_video(PROMPT, **SMALL)
    assert isinstance(drawn.seed, int) and drawn.seed >= 0
    replay = t2v.generate_video(PROMPT, seed=drawn.seed, **SMALL)
    np.testing.assert_array_equal(drawn.frames, replay.frames)
