"""One request on several ranks: ``VideoGenerator.from_pretrained(..., num_gpus=N)`` on CPU
ranks over gloo gives the single-process video, and the long-lived ranks survive cancels and
bad input, and are replaced after one of them dies.

Token counts of the latent grids do not divide by the SP degree (45 tokens for SP 2 and 4,
20 for SP 3), so uneven sequence splits are exercised. One SP=2 generator serves most tests.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import psutil
import pytest
from PIL import Image

from fastvideo import VideoGenerator
from fastvideo.executor import RankGroupError
from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.pipelines.pipeline_batch_info import GenerationCancelled

pytestmark = pytest.mark.timeout(300)

PROMPT = "a cat and a dog baking a cake together in a kitchen"
#: (T, H, W) latent tokens after (1, 2, 2) patches: 3 x 3 x 5 = 45.
REQUEST = dict(
    prompt=PROMPT,
    negative_prompt="blurry, static",
    height=48,
    width=80,
    num_frames=9,
    num_inference_steps=3,
    guidance_scale=5.0,
    seed=7,
)
#: 2 x 2 x 5 = 20 tokens: uneven over 3 ranks.
REQUEST_20_TOKENS = {**REQUEST, "height": 32, "width": 80, "num_frames": 5}
I2V_REQUEST = {**REQUEST, "height": 32, "width": 48, "guidance_scale": 4.0, "seed": 11}
TOLERANCE = 1e-5
ENGINE = dict(device="cpu", dist_timeout_s=60)


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def single(tiny_t2v):
    return VideoGenerator.from_pretrained(tiny_t2v, device="cpu")


@pytest.fixture(scope="module")
def reference(single):
    return single.generate_video(**REQUEST).frames


@pytest.fixture(scope="module")
def sp2(tiny_t2v):
    with VideoGenerator.from_pretrained(tiny_t2v, num_gpus=2, **ENGINE) as generator:
        yield generator


def _max_diff(frames, reference) -> float:
    assert frames.shape == reference.shape
    assert reference.std() > 1e-3  # a real video, not a constant that would match trivially
    return float(np.abs(frames - reference).max())


# -- layout ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        (dict(num_gpus=3, cfg_parallel=True), "num_gpus", "even num_gpus"),
        (dict(num_gpus=4, sp_size=3), "sp_size", "num_gpus must equal sp_size x 1"),
        (dict(num_gpus=4, sp_size=4, cfg_parallel=True), "sp_size", "use sp_size=2"),
        (dict(num_gpus=4, tp_size=3), "tp_size", "must divide num_gpus=4"),
        (dict(num_gpus=0), "num_gpus", "positive integer"),
        (dict(num_gpus=2, dist_timeout_s=0), "dist_timeout_s", "positive number"),
    ],
)
def test_layout_errors_name_the_field(kwargs, field, message):
    with pytest.raises(ValueError, match=field) as err:
        FastVideoArgs.from_kwargs("/nowhere", **kwargs)
    assert message in str(err.value)


def test_layout_defaults_fill_sp_size_from_num_gpus():
    assert FastVideoArgs.from_kwargs("/m", num_gpus=4).sp_size == 4
    assert FastVideoArgs.from_kwargs("/m", num_gpus=4, cfg_parallel=True).sp_size == 2
    assert FastVideoArgs.from_kwargs("/m").sp_size == 1


# -- parity ----------------------------------------------------------------------------------


def test_sp2_matches_single_process_and_reports_progress_in_order(sp2, reference):
    steps: list[int] = []
    result = sp2.generate_video(**REQUEST, callback=lambda p: steps.append(p.step))
    assert steps == [1, 2, 3]
    assert result.seed == REQUEST["seed"]
    assert {"prompt_encoding_stage", "denoising_stage", "decoding_stage"} <= set(
        result.stage_timings
    )
    assert _max_diff(result.frames, reference) <= TOLERANCE


@pytest.mark.parametrize(
    ("engine", "request_"),
    [
        pytest.param(dict(num_gpus=2, cfg_parallel=True), REQUEST, id="cfg2"),
        pytest.param(dict(num_gpus=4), REQUEST, id="sp4"),
        pytest.param(dict(num_gpus=3), REQUEST_20_TOKENS, id="sp3-ring"),
        pytest.param(dict(num_gpus=2, sp_size=2, tp_size=2), REQUEST, id="sp2-tp2"),
    ],
)
def test_layout_matches_single_process(tiny_t2v, single, engine, request_):
    expected = single.generate_video(**request_).frames
    with VideoGenerator.from_pretrained(tiny_t2v, **engine, **ENGINE) as generator:
        frames = generator.generate_video(**request_).frames
        pids = generator.executor.pids
    assert _max_diff(frames, expected) <= TOLERANCE
    # close() stopped every rank.
    assert not [pid for pid in pids if psutil.pid_exists(pid) and _is_running(pid)]


def test_image_to_video_sp2_matches_single_process(tiny_i2v):
    request = {**I2V_REQUEST, "image": _image()}
    expected = VideoGenerator.from_pretrained(tiny_i2v, device="cpu").generate_video(**request)
    with VideoGenerator.from_pretrained(tiny_i2v, num_gpus=2, **ENGINE) as generator:
        frames = generator.generate_video(**request).frames
    assert _max_diff(frames, expected.frames) <= TOLERANCE


def _is_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- long-lived ranks ------------------------------------------------------------------------


def test_ranks_are_the_same_processes_across_requests(sp2, reference):
    pids = sp2.executor.pids
    assert len(pids) == 2 and os.getpid() not in pids
    first = sp2.generate_video(**REQUEST)
    second = sp2.generate_video(**{**REQUEST, "seed": 8})
    assert sp2.executor.pids == pids
    assert np.array_equal(first.frames, sp2.generate_video(**REQUEST).frames)
    assert not np.array_equal(first.frames, second.frames)


def test_cancel_from_the_callback_stops_every_rank_and_the_next_request_works(sp2, reference):
    pids = sp2.executor.pids
    steps: list[int] = []

    def stop_after_two(progress) -> bool:
        steps.append(progress.step)
        return progress.step == 2

    with pytest.raises(GenerationCancelled, match="after step 2"):
        sp2.generate_video(**{**REQUEST, "num_inference_steps": 6}, callback=stop_after_two)
    assert steps == [1, 2]
    # Every rank left the loop at the same step: the next request runs in lockstep again.
    assert _max_diff(sp2.generate_video(**REQUEST).frames, reference) <= TOLERANCE
    assert sp2.executor.pids == pids


def test_a_failing_callback_stops_the_ranks_and_its_error_reaches_the_caller(sp2, reference):
    def broken(progress) -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        sp2.generate_video(**REQUEST, callback=broken)
    assert _max_diff(sp2.generate_video(**REQUEST).frames, reference) <= TOLERANCE


def test_bad_input_raises_value_error_and_keeps_the_ranks(sp2):
    pids = sp2.executor.pids
    with pytest.raises(ValueError, match="width=40 must be a multiple of 16"):
        sp2.generate_video(**{**REQUEST, "width": 40})
    assert sp2.executor.pids == pids
    assert sp2.generate_video(**{**REQUEST, "num_inference_steps": 1}).num_frames == 9


def test_killed_rank_fails_the_request_naming_it_and_the_group_restarts(sp2, reference):
    old = sp2.executor.pids
    killed_at: list[float] = []

    def kill_rank_1(progress) -> None:
        if progress.step == 1:
            os.kill(old[1], signal.SIGKILL)
            killed_at.append(time.monotonic())

    with pytest.raises(RankGroupError) as err:
        sp2.generate_video(**{**REQUEST, "num_inference_steps": 20}, callback=kill_rank_1)
    assert time.monotonic() - killed_at[0] < 15
    message = str(err.value)
    assert "rank 1 of 2" in message and f"pid {old[1]}" in message
    assert "SIGKILL" in message
    assert not any(_is_running(pid) for pid in old)
    # The next request starts a fresh group and succeeds.
    assert _max_diff(sp2.generate_video(**REQUEST).frames, reference) <= TOLERANCE
    assert not set(sp2.executor.pids) & set(old)


def test_hung_rank_fails_the_request_within_the_collective_timeout(tiny_t2v):
    engine = {**ENGINE, "dist_timeout_s": 5}
    with VideoGenerator.from_pretrained(tiny_t2v, num_gpus=2, cfg_parallel=True, **engine) as gen:
        pids = gen.executor.pids
        stopped_at: list[float] = []

        def freeze_rank_1(progress) -> None:
            if progress.step == 1:
                os.kill(pids[1], signal.SIGSTOP)  # alive, but never reaches the next collective
                stopped_at.append(time.monotonic())

        with pytest.raises(RankGroupError, match="collective failed or timed out") as err:
            gen.generate_video(**{**REQUEST, "num_inference_steps": 20}, callback=freeze_rank_1)
        assert time.monotonic() - stopped_at[0] < 5 + 10
        assert "dist_timeout_s=5" in str(err.value)
        # The frozen rank was killed with the rest of the group.
        assert not any(_is_running(pid) for pid in pids)


def test_cli_generates_with_two_cfg_parallel_ranks(tmp_path, tiny_t2v):
    import av

    from fastvideo.entrypoints.cli import main

    out = tmp_path / "cfg2.mp4"
    code = main(
        [
            "generate", "--model-path", tiny_t2v, "--prompt", "a red panda",
            "--output-path", str(out), "--height", "32", "--width", "48", "--num-frames", "5",
            "--num-inference-steps", "2", "--device", "cpu", "--num-gpus", "2",
            "--cfg-parallel", "--no-progress", "--seed", "1",
        ]
    )  # fmt: skip
    assert code == 0
    with av.open(str(out)) as container:
        assert len(list(container.decode(video=0))) == 5
