"""The public entry point: load a model folder once, generate many videos.

One process runs the pipeline itself; with ``num_gpus > 1`` the pipeline runs on long-lived
rank processes (``fastvideo.executor``) and this object only talks to rank 0. Either way the
pipeline is built and run by ``fastvideo.pipelines.runner`` (``build_pipeline``, ``render``,
``RenderOutput``; still importable from here).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastvideo.executor import MultiRankExecutor
from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.models.loader.model_folder import read_model_index, resolve_model_path
from fastvideo.models.vaes.wanvae import WanVAEConfig
from fastvideo.pipelines.composed_pipeline_base import ComposedPipelineBase
from fastvideo.pipelines.pipeline_batch_info import ForwardBatch, StepCallback, StepProgress
from fastvideo.pipelines.pipeline_registry import get_pipeline_class
from fastvideo.pipelines.runner import (
    TENSOR_FIELDS,
    RenderOutput,
    WireTensor,
    build_pipeline,
    encode_prompt,
    render,
)
from fastvideo.pipelines.stages.input_validation import InputValidationStage
from fastvideo.pipelines.stages.latent_preparation import draw_noise, noise_shape
from fastvideo.utils.video_io import write_mp4

#: ``generate_video(output_type=...)``: what diffusers' ``VideoProcessor`` returns for each.
OUTPUT_TYPES = ("np", "pil", "pt")
#: ``from_pretrained(torch_dtype=...)``: the dtypes it takes, and the precision each sets.
TORCH_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
}
_PRECISION_FIELDS = (
    "dit_precision",
    "vae_precision",
    "text_encoder_precision",
    "image_encoder_precision",
)


@dataclass
class GenerationResult:
    """What ``generate_video`` returns.

    A call renders ``len(prompts) * num_videos_per_prompt`` videos, in prompt order (prompt
    0's videos first). The singular fields (``frames``, ``video_path``, ``seed``) describe
    the video of a single-video call, as they always have; with several videos they are
    None and the plural fields (``videos``, ``video_paths``, ``seeds``, ``prompts``), which
    every call fills, hold them all.
    """

    #: (num_frames, height, width, 3) float32 in [0, 1]; None when return_frames=False or
    #: the call made several videos.
    frames: np.ndarray | None
    #: The mp4 written for a single-video call with output_path, else None.
    video_path: Path | None
    #: The seed of a single-video call's noise; None with several videos, and when the noise
    #: came from a caller's ``generator`` (no seed reproduces it).
    seed: int | None
    fps: int
    num_frames: int
    height: int
    width: int
    #: Wall seconds per stage, summed over the videos (plus "mp4_encode" when files were
    #: written).
    stage_timings: dict[str, float] = field(default_factory=dict)
    #: Every video, as diffusers' video processor returns them for ``output_type``: "np"
    #: (the default) a float32 array (B, T, H, W, 3) in [0, 1]; "pil" a list (per video) of
    #: lists of PIL images; "pt" a float32 CPU tensor (B, T, 3, H, W) in [0, 1]. None when
    #: return_frames=False.
    videos: np.ndarray | list[list[Any]] | torch.Tensor | None = None
    #: Each video's seed (``seed + i`` for the i-th video when ``seed=`` was given, drawn
    #: when not); None for a video whose noise came from a caller's ``generator``.
    seeds: list[int | None] = field(default_factory=list)
    #: The mp4 of each video, when output_path was given: output_path itself for a single
    #: video, ``<stem>-<i><suffix>`` beside it for the i-th of several.
    video_paths: list[Path] = field(default_factory=list)
    #: Each video's prompt (None for a video rendered from ``prompt_embeds`` alone).
    prompts: list[str | None] = field(default_factory=list)


def _load_image(image: Any) -> Any:
    """A PIL image from a PIL image, a path, or an (H, W, 3) uint8/float array."""
    from PIL import Image

    if image is None or isinstance(image, Image.Image):
        return image.convert("RGB") if image is not None else None
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"image={str(image)!r}: no such file")
        try:
            with Image.open(path) as opened:
                return opened.convert("RGB")
        except OSError as err:
            raise ValueError(f"image={str(image)!r} is not a readable image ({err})") from None
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 3:
        data = (
            image
            if image.dtype == np.uint8
            else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        )
        return Image.fromarray(data)
    raise ValueError(
        f"image must be a PIL image, a file path or an (H, W, 3) array, got {type(image).__name__}"
    )


def precision_of_torch_dtype(torch_dtype: Any, name: str = "torch_dtype") -> str:
    """The precision name ("fp32", "bf16", "fp16") ``from_pretrained(torch_dtype=...)`` sets:
    from a torch.dtype, its name ("bfloat16", "torch.bfloat16") or a precision name. A bad
    value is a ValueError naming the argument (``name``)."""
    if isinstance(torch_dtype, torch.dtype) and torch_dtype in TORCH_DTYPES:
        return TORCH_DTYPES[torch_dtype]
    if isinstance(torch_dtype, str):
        given = torch_dtype.removeprefix("torch.")
        for dtype, precision in TORCH_DTYPES.items():
            if given in (str(dtype).removeprefix("torch."), precision):
                return precision
    allowed = ", ".join(str(dtype) for dtype in TORCH_DTYPES)
    names = ", ".join(repr(str(dtype).removeprefix("torch.")) for dtype in TORCH_DTYPES)
    raise ValueError(f"{name}={torch_dtype!r} is not supported; use {allowed} (or {names})")


def device_problem(device: str | None) -> tuple[str, str] | None:
    """Why ``device`` cannot run on this machine, and a device to use instead; None when it
    can, or when it is no device string at all (``FastVideoArgs.validate`` says so)."""
    if device is None:
        return None
    try:
        wanted = torch.device(device)
    except (RuntimeError, TypeError):
        return None
    if wanted.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)", "cpu"
    count = torch.cuda.device_count()
    if wanted.index is not None and wanted.index >= count:
        return f"only {count} CUDA device(s) are visible (cuda:0 to cuda:{count - 1})", "cuda:0"
    return None


def _vae_config_of_folder(folder: Path) -> Any:
    """The VAE config of a model folder (what the ranks of a multi-rank generator load)."""
    path = folder / "vae" / "config.json"
    if not path.is_file():
        raise ValueError(f"generator= needs the VAE's config: {path} is missing")
    config = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(WanVAEConfig)}
    return WanVAEConfig(**{k: v for k, v in config.items() if k in known})


def _as_prompt_list(prompt: Any) -> list[str]:
    prompts = list(prompt) if isinstance(prompt, list | tuple) else [prompt]
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(
            f"prompt must be a non-empty string or a non-empty list of them, got {prompt!r}"
        )
    return prompts


def _check_embeds(embeds: Any, num_prompts: int, name: str) -> None:
    """``embeds`` is None or a ``(num_prompts, sequence, dim)`` tensor: one row per prompt."""
    if embeds is not None and (
        not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[0] != num_prompts
    ):
        got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
        raise ValueError(
            f"{name} must be a ({num_prompts}, sequence, dim) torch.Tensor, one row per prompt; "
            f"got {got}"
        )


def _prompts_of(prompt: Any, prompt_embeds: Any) -> list[Any]:
    """The prompts of a call, one per video group: None for each row of ``prompt_embeds``
    when only embeddings came."""
    if prompt is None and isinstance(prompt_embeds, torch.Tensor) and prompt_embeds.ndim == 3:
        return [None] * prompt_embeds.shape[0]
    return list(_as_prompt_list(prompt))


def _rows(embeds: torch.Tensor | None, index: int) -> torch.Tensor | None:
    """Prompt ``index``'s embeddings, (1, sequence, dim); None stays None."""
    return None if embeds is None else embeds[index : index + 1]


def _as_negative_list(negative_prompt: Any, num_prompts: int) -> list[str | None]:
    if negative_prompt is None or isinstance(negative_prompt, str):
        return [negative_prompt] * num_prompts
    if isinstance(negative_prompt, list | tuple):
        if len(negative_prompt) != num_prompts or not all(
            isinstance(n, str) for n in negative_prompt
        ):
            raise ValueError(
                f"negative_prompt must be a string or a list of {num_prompts} string(s), one "
                f"per prompt; got a list of {len(negative_prompt)}"
            )
        return list(negative_prompt)
    raise ValueError(
        f"negative_prompt must be a string or a list of strings, got "
        f"{type(negative_prompt).__name__}"
    )


def _as_generators(generator: Any, num_videos: int) -> list[torch.Generator] | None:
    """The caller's generator(s) as a list: one shared by every video, or one per video."""
    if generator is None:
        return None
    if isinstance(generator, torch.Generator):
        return [generator]
    if isinstance(generator, list | tuple) and all(
        isinstance(g, torch.Generator) for g in generator
    ):
        if len(generator) != num_videos:
            raise ValueError(
                f"generator is a list of {len(generator)}; it needs one torch.Generator per "
                f"video: {num_videos} (len(prompt) x num_videos_per_prompt)"
            )
        if len({g.device.type for g in generator}) > 1:
            raise ValueError("generator: every torch.Generator of the list must be on one device")
        return list(generator)
    raise ValueError(
        f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}"
    )


def _postprocess(frames: list[np.ndarray], output_type: str) -> Any:
    """Videos (each (T, H, W, 3) float32 in [0, 1]) as diffusers' ``VideoProcessor.
    postprocess_video`` returns them for ``output_type``."""
    stacked = frames[0][None] if len(frames) == 1 else np.stack(frames)
    if output_type == "np":
        return stacked
    if output_type == "pt":
        return torch.from_numpy(stacked).permute(0, 1, 4, 2, 3).contiguous()
    from diffusers.image_processor import VaeImageProcessor

    return [VaeImageProcessor.numpy_to_pil(video) for video in stacked]


def _to_ranks(request: dict[str, Any]) -> dict[str, Any]:
    """The request as the executor's connection can carry it: tensors as :class:`WireTensor`."""
    return {
        k: WireTensor.pack(v) if k in TENSOR_FIELDS and isinstance(v, torch.Tensor) else v
        for k, v in request.items()
    }


def _video_paths(output_path: str | os.PathLike, count: int) -> list[Path]:
    path = Path(output_path)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


class VideoGenerator:
    """One loaded model. With ``num_gpus > 1`` the pipeline lives in long-lived rank
    processes (``fastvideo.executor``) and ``pipeline`` is None here; ``close()`` (or the
    ``with`` block, or interpreter exit) stops them."""

    def __init__(
        self,
        pipeline: ComposedPipelineBase | None,
        fastvideo_args: FastVideoArgs,
        executor: MultiRankExecutor | None = None,
    ) -> None:
        if (pipeline is None) == (executor is None):
            raise ValueError("VideoGenerator needs either a pipeline or a multi-rank executor")
        self.pipeline = pipeline
        #: The multi-rank generator's shared input checks (``_input_validation``).
        self._rank_validation: InputValidationStage | None = None
        self.fastvideo_args = fastvideo_args
        self.executor = executor

    @classmethod
    def from_pretrained(
        cls,
        model_path: str | os.PathLike,
        *,
        torch_dtype: Any = None,
        dtype: Any = None,
        **kwargs: Any,
    ) -> VideoGenerator:
        """Load the pipeline ``model_index.json`` names (or ``pipeline_class_name=``).

        ``kwargs`` are ``FastVideoArgs`` fields. ``torch_dtype`` (as in diffusers: a
        torch.dtype among float32, bfloat16, float16, or its name; ``dtype``, diffusers'
        newer name for it, is the same) sets every component precision (``dit_precision``,
        ``vae_precision``, ``text_encoder_precision``, ``image_encoder_precision``) not
        given explicitly; without it each component gets its default (on GPU, bf16 for the
        DiT and the text encoder, fp32 for the VAE and the image encoder).

        ``num_gpus=N`` (N > 1) starts N rank processes laid out by ``sp_size``, ``tp_size``
        and ``cfg_parallel`` and waits until every rank has loaded the pipeline. On a machine
        without GPUs, or with ``device="cpu"``, the ranks run on the CPU over gloo.
        """
        if torch_dtype is not None and dtype is not None:
            raise ValueError("pass torch_dtype= or dtype= (the same setting), not both")
        if torch_dtype is not None or dtype is not None:
            name, value = ("torch_dtype", torch_dtype) if dtype is None else ("dtype", dtype)
            precision = precision_of_torch_dtype(value, name)
            for precision_field in _PRECISION_FIELDS:
                if kwargs.get(precision_field) is None:
                    kwargs[precision_field] = precision
        args = FastVideoArgs.from_kwargs(str(model_path), **kwargs)
        problem = device_problem(args.device)
        if problem is not None:
            reason, instead = problem
            raise ValueError(f"device={args.device!r}: {reason}; use device={instead!r}")
        if args.num_gpus == 1:
            return cls(build_pipeline(model_path, args), args)
        folder = resolve_model_path(model_path)
        # Fail here, in the caller, on a folder no rank could load.
        get_pipeline_class(args.pipeline_class_name or read_model_index(folder)["_class_name"])
        executor = MultiRankExecutor(folder, args)
        executor.start()
        return cls(None, args, executor=executor)

    def close(self) -> None:
        """Stop the rank processes of a multi-rank generator (a no-op otherwise)."""
        if self.executor is not None:
            self.executor.close()

    def __enter__(self) -> VideoGenerator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def generate_video(
        self,
        prompt: str | Sequence[str] | None,
        negative_prompt: str | Sequence[str] | None = None,
        image: Any = None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        seed: int | None = None,
        fps: int = 16,
        output_path: str | os.PathLike | None = None,
        return_frames: bool = True,
        callback: StepCallback | None = None,
        *,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        output_type: str | None = None,
        progress: bool = True,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        guidance_scale_2: float | None = None,
    ) -> GenerationResult:
        """Render ``num_videos_per_prompt`` videos of each prompt, one after another, in
        prompt order (prompt 0's videos first); see :class:`GenerationResult`.

        ``prompt``: a string or a list of them; ``negative_prompt``: one string for every
        prompt, or a list as long as ``prompt``. ``image`` (image-to-video) is used for every
        video.

        The initial noise: with ``seed=s``, the i-th video's comes from ``s + i``
        (``torch.Generator("cpu").manual_seed(s + i)``, as ever); with ``generator=``, as
        diffusers draws it: one ``torch.Generator`` draws the noise of every video at once
        (``randn_tensor((B, ...), generator)``), a list of them one video each, so the
        videos equal diffusers' pipeline called with the same generator(s). Neither: a fresh
        seed per video. With ``num_gpus > 1`` the noise is drawn here and sent to the ranks.

        ``output_path`` with several videos writes ``<stem>-<i><suffix>`` per video. Files
        are written once every video is rendered: a cancelled or failed call writes none.

        ``callback(progress)`` runs here, in the caller's process, after every denoising step
        of every video (``progress.step`` counts the steps of the current video); returning
        True stops the call with ``GenerationCancelled`` (on every rank, after the same
        step). ``progress`` shows a tqdm bar of the steps on stderr.

        ``prompt_embeds`` / ``negative_prompt_embeds`` (as diffusers takes them): the text
        encoder's output for each prompt, ``(num_prompts, sequence, dim)``, for example from
        :meth:`encode_prompt`; those texts are not encoded again, so the videos equal the
        ones the prompts give. ``prompt`` may then be None, or name the prompts (one per row:
        only a label, ``GenerationResult.prompts``). Without ``negative_prompt_embeds`` the
        negative prompt is encoded as usual (under guidance).

        ``guidance_scale_2``: the low-noise expert's guidance scale, for a Wan2.2 two-expert
        model (default: ``guidance_scale``); refused for a model with one expert.
        """
        prompts = _prompts_of(prompt, prompt_embeds)
        _check_embeds(prompt_embeds, len(prompts), "prompt_embeds")
        _check_embeds(negative_prompt_embeds, len(prompts), "negative_prompt_embeds")
        negatives = _as_negative_list(negative_prompt, len(prompts))
        per_prompt = num_videos_per_prompt
        if isinstance(per_prompt, bool) or not isinstance(per_prompt, int) or per_prompt < 1:
            raise ValueError(
                f"num_videos_per_prompt must be a positive integer, got {num_videos_per_prompt!r}"
            )
        count = len(prompts) * per_prompt
        if output_type is not None and output_type not in OUTPUT_TYPES:
            raise ValueError(
                f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}"
            )
        if not isinstance(progress, bool):
            raise ValueError(f"progress must be True or False, got {progress!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        generators = _as_generators(generator, count)
        if generators is not None and seed is not None:
            raise ValueError("pass seed= or generator=, not both")
        loaded_image = _load_image(image)
        requests: list[dict[str, Any]] = [
            dict(
                prompt=text,
                negative_prompt=negative,
                image=loaded_image,
                height=height,
                width=width,
                num_frames=num_frames,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                guidance_scale_2=guidance_scale_2,
                seed=None if seed is None else seed + i * per_prompt + j,
                fps=fps,
                prompt_embeds=_rows(prompt_embeds, i),
                negative_prompt_embeds=_rows(negative_prompt_embeds, i),
            )
            for i, (text, negative) in enumerate(zip(prompts, negatives, strict=True))
            for j in range(per_prompt)
        ]
        # Refuse bad input before any video is rendered (or any noise drawn): with the
        # pipeline's own checks here, the ones every pipeline shares for a multi-rank one.
        validation = self._input_validation()
        for request in requests:
            validation.validate(ForwardBatch(**request))
        if generators is not None:
            self._attach_noise(requests, generators)
        elif self.executor is not None:
            for request in requests:
                if request["seed"] is None:
                    # Every rank must draw the same noise: choose the seed once, here.
                    request["seed"] = secrets.randbelow(2**31 - 1)

        rendered = self._render_all(requests, callback, progress)
        timings: dict[str, float] = {}
        for one in rendered:
            for stage, seconds in one.stage_timings.items():
                timings[stage] = timings.get(stage, 0.0) + seconds
        frames = [one.frames for one in rendered]
        video_paths: list[Path] = []
        if output_path is not None:
            started = time.perf_counter()
            for video, path in zip(frames, _video_paths(output_path, count), strict=True):
                video_paths.append(write_mp4(video, path, fps=fps))
            timings["mp4_encode"] = time.perf_counter() - started
        single = count == 1
        first = frames[0]
        return GenerationResult(
            frames=first if single and return_frames else None,
            video_path=video_paths[0] if single and video_paths else None,
            seed=rendered[0].seed if single else None,
            fps=fps,
            num_frames=first.shape[0],
            height=first.shape[1],
            width=first.shape[2],
            stage_timings=timings,
            videos=_postprocess(frames, output_type or "np") if return_frames else None,
            seeds=[one.seed for one in rendered],
            video_paths=video_paths,
            prompts=[request["prompt"] for request in requests],
        )

    def encode_prompt(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        do_classifier_free_guidance: bool = True,
        max_sequence_length: int = 512,
        *,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text encoder's output for ``prompt`` (and, with guidance, ``negative_prompt``:
        the empty prompt when None), as diffusers' ``WanPipeline.encode_prompt`` returns it:
        ``(prompt_embeds, negative_prompt_embeds)``, each ``(num_prompts, sequence, dim)``;
        the second is None without guidance. Embeddings passed in are returned as they are,
        and their texts are not encoded.

        Give them to :meth:`generate_video` (``prompt_embeds=``, ``negative_prompt_embeds=``)
        to render several videos of a prompt while encoding it once: the videos equal the
        ones the prompt gives. On the text encoder's device; with ``num_gpus > 1`` every rank
        encodes (a tensor-parallel encoder needs them all) and the tensors come back on the
        CPU.
        """
        prompts = _as_prompt_list(prompt)
        negatives = _as_negative_list(negative_prompt, len(prompts))
        _check_embeds(prompt_embeds, len(prompts), "prompt_embeds")
        _check_embeds(negative_prompt_embeds, len(prompts), "negative_prompt_embeds")
        if (
            isinstance(max_sequence_length, bool)
            or not isinstance(max_sequence_length, int)
            or max_sequence_length < 1
        ):
            raise ValueError(
                f"max_sequence_length must be a positive integer, got {max_sequence_length!r}"
            )
        request: dict[str, Any] = dict(
            prompt=prompts if len(prompts) > 1 else prompts[0],
            # None: the empty prompt (the stage's default, as diffusers').
            negative_prompt=None
            if negative_prompt is None
            else (negatives if len(negatives) > 1 else negatives[0]),
            # The stage encodes the negative prompt exactly when guidance_scale > 1.
            guidance_scale=2.0 if do_classifier_free_guidance else 1.0,
            max_sequence_length=max_sequence_length,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
        )
        if self.executor is None:
            assert self.pipeline is not None
            return encode_prompt(self.pipeline, self.fastvideo_args, request)
        embeds, negative = self.executor.encode(_to_ranks(request))
        return embeds.unpack(), negative.unpack() if negative is not None else None

    def _input_validation(self) -> InputValidationStage:
        if self.pipeline is not None:
            stage = getattr(self.pipeline, "input_validation_stage", None)
            if isinstance(stage, InputValidationStage):
                return stage
            return InputValidationStage()
        # The ranks hold the pipeline; what the shared checks need comes from the folder,
        # read once (not on every request).
        if self._rank_validation is None:
            assert self.executor is not None
            index = read_model_index(Path(self.executor.model_path))
            two_experts = index.get("boundary_ratio") is not None
            self._rank_validation = InputValidationStage(two_experts=two_experts)
        return self._rank_validation

    def _attach_noise(
        self, requests: list[dict[str, Any]], generators: list[torch.Generator]
    ) -> None:
        """Draw every video's initial noise from the caller's generator(s) in one
        ``randn_tensor`` call, as diffusers does for a batch, and give each request its own."""
        first = requests[0]
        if self.pipeline is not None:
            vae_config = self.pipeline.get_module("vae").config
            device = self.fastvideo_args.torch_device
        else:
            assert self.executor is not None
            vae_config = _vae_config_of_folder(self.executor.model_path)
            # Sent to the ranks as CPU arrays; a CUDA generator draws on its own device.
            device = generators[0].device if generators[0].device.type == "cuda" else "cpu"
            device = torch.device(device)
        gen_device = generators[0].device
        if gen_device.type not in ("cpu", device.type):
            raise ValueError(
                f"generator is on {gen_device} but the noise is drawn on {device}: use a CPU "
                f"torch.Generator (the same noise on any device) or one on {device.type}"
            )
        shape = noise_shape(
            vae_config, len(requests), first["num_frames"], first["height"], first["width"]
        )
        noise = draw_noise(shape, generators[0] if len(generators) == 1 else generators, device)
        for index, request in enumerate(requests):
            mine = noise[index : index + 1]
            # To the ranks as an array: a tensor sent over the executor's connection would
            # travel as a shared-memory handle the rank processes cannot open.
            request["latents"] = mine if self.pipeline is not None else mine.cpu().numpy().copy()

    def _render_all(
        self, requests: list[dict[str, Any]], callback: StepCallback | None, progress: bool
    ) -> list[RenderOutput]:
        from tqdm import tqdm

        steps = requests[0]["num_inference_steps"]
        count = len(requests)
        bar = tqdm(total=steps * count, desc="denoising", unit="step", disable=not progress)
        rendered: list[RenderOutput] = []
        try:
            for index, request in enumerate(requests):
                if count > 1:
                    bar.set_description(f"denoising video {index + 1}/{count}")
                on_step = callback
                if progress:

                    def on_step(step: StepProgress, done: int = index * steps) -> bool | None:
                        bar.update(done + step.step - bar.n)
                        return callback(step) if callback is not None else None

                rendered.append(self._render_one(request, on_step))
        finally:
            bar.close()
        return rendered

    def _render_one(self, request: dict[str, Any], callback: StepCallback | None) -> RenderOutput:
        if self.executor is not None:
            return self.executor.generate(_to_ranks(request), callback)
        assert self.pipeline is not None
        return render(self.pipeline, self.fastvideo_args, request, callback)
