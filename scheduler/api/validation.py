"""``POST /v1/videos``: read the body (multipart or JSON) and check it against the model.

The official SDK always sends multipart/form-data, so every value may arrive as a string
(``"16"``), and nested dicts as bracketed keys (``metadata[shot]``); JSON bodies carry typed
values. Both become one :class:`VideoRequest`, or an :class:`ApiError` naming the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from fvb_core.jobs import JobParams
from fvb_core.models_config import ServedModel
from scheduler.api.body import check_declared_length, check_text, read_json
from scheduler.api.errors import ApiError
from scheduler.api.images import (
    MAX_IMAGE_BYTES,
    ReferenceImage,
    bytes_from_data_url,
    decode_image,
)

MAX_PROMPT_CHARS = 2000
GUIDANCE_RANGE = (0.0, 30.0)
PRIORITY_RANGE = (-10, 10)
#: Default priority of a video in a batch (interactive videos default to 0): queued bulk work
#: yields to interactive requests unless it asks for a priority itself.
BATCH_DEFAULT_PRIORITY = -5
FPS_RANGE = (1, 120)
SEED_MAX = 2**32 - 1
DEFAULT_SECONDS = 4.0
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 5.0
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
#: A 10 MiB image as base64 in a data URL, plus the other fields.
MAX_BODY_BYTES = 16 * 1024 * 1024

FIELDS = frozenset(
    {
        "model",
        "prompt",
        "size",
        "seconds",
        "input_reference",
        "negative_prompt",
        "num_frames",
        "num_inference_steps",
        "guidance_scale",
        "guidance_scale_2",
        "seed",
        "fps",
        "priority",
        "metadata",
        "batch_id",
    }
)

_BRACKETED = re.compile(r"^(\w+)\[([^\[\]]*)\]$")
_SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
# Numbers sent as text (multipart forms): ASCII digits only; int() and float() would also
# take other scripts' digits ("６４").
_INT_TEXT = re.compile(r"^[+-]?[0-9]+$")
_FLOAT_TEXT = re.compile(r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$")


# --- reading the body ------------------------------------------------------------------


@dataclass(frozen=True)
class UploadedImage:
    """A multipart file part (kept apart from strings, which may be data URLs)."""

    data: bytes


async def read_create_body(request: Request) -> dict[str, Any]:
    """The submitted fields as a dict, from JSON or multipart/form-data."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        body = await read_json(request, MAX_BODY_BYTES)
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object", code="invalid_json")
        return body
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        check_declared_length(request, MAX_BODY_BYTES)
        return await _read_form(request)
    raise ApiError(
        415,
        "Content-Type must be multipart/form-data or application/json",
        code="unsupported_media_type",
    )


async def _read_form(request: Request) -> dict[str, Any]:
    try:
        # Non-file parts may be a data URL of a 10 MiB image: allow for base64's growth.
        form = await request.form(max_part_size=MAX_IMAGE_BYTES * 4 // 3 + 1024)
    except Exception as err:  # starlette's MultiPartException and parser errors
        raise ApiError(400, f"could not read the form body: {err}", code="invalid_form") from err
    fields: dict[str, Any] = {}
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "input_reference":
                    raise ApiError.invalid(key, f"unexpected file field '{key}'", "unknown_field")
                data = await value.read(MAX_IMAGE_BYTES + 1)
                fields[key] = UploadedImage(data)
                continue
            check_text(key, value)
            nested = _BRACKETED.match(key)
            if nested:
                name, sub = nested.groups()
                target = fields.setdefault(name, {})
                if not isinstance(target, dict):
                    raise ApiError.invalid(name, f"'{name}' given both as a value and a dict")
                target[sub] = value
            elif key in fields:
                raise ApiError.invalid(key, f"field '{key}' given more than once")
            else:
                fields[key] = value
    finally:
        await form.close()
    return fields


# --- checking it -------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoRequest:
    """A request that passed every check: what the worker will render."""

    model: ServedModel
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_frames: int
    seconds: str
    fps: int
    num_inference_steps: int
    guidance_scale: float
    #: Two-expert models only: the low-noise expert's scale (None: ``guidance_scale``).
    guidance_scale_2: float | None
    #: As given; None means "pick one" (picked once, at submission, and stored).
    seed: int | None
    priority: int
    metadata: dict[str, str] = field(default_factory=dict)
    batch_id: str | None = None
    image: ReferenceImage | None = None

    def request_hash(self) -> str:
        """sha256 of the normalised request: the same request sent as JSON or as a form,
        with ``"4"`` or ``4``, hashes the same (the idempotency check compares these)."""
        document = {
            "model": self.model.name,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "width": self.width,
            "height": self.height,
            "num_frames": self.num_frames,
            "seconds": self.seconds,
            "fps": self.fps,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "guidance_scale_2": self.guidance_scale_2,
            "seed": self.seed,
            "priority": self.priority,
            "metadata": self.metadata,
            "batch_id": self.batch_id,
            "image_sha256": self.image.sha256 if self.image else None,
        }
        canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def job_params(self, seed: int, input_image_key: str | None) -> JobParams:
        """The job's parameters, every field recorded: what the worker renders."""
        return JobParams(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=self.width,
            height=self.height,
            num_frames=self.num_frames,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            guidance_scale_2=self.guidance_scale_2,
            seed=seed,
            fps=self.fps,
            seconds=self.seconds,
            metadata=self.metadata,
            input_image_key=input_image_key,
        )


def _given(fields: dict[str, Any], name: str) -> bool:
    return fields.get(name) is not None


def _as_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    number: int | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and _INT_TEXT.match(value.strip()):
        number = int(value.strip())
    if number is None:
        raise ApiError.invalid(name, f"{name} must be an integer, got {_shown(value)}")
    _check_range(name, number, low, high)
    return number


def _as_float(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    number: float | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
        number = float(value.strip())
    if number is None or not math.isfinite(number):
        raise ApiError.invalid(name, f"{name} must be a finite number, got {_shown(value)}")
    _check_range(name, number, low, high)
    return number


def _shown(value: Any, limit: int = 40) -> str:
    """A value as an error message may quote it: short (an int of 400 digits is no float)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _check_range(name: str, number: float, low: float | None, high: float | None) -> None:
    if (low is not None and number < low) or (high is not None and number > high):
        if low is not None and high is not None:
            bounds = f"between {low} and {high}"
        elif low is not None:
            bounds = f"at least {low}"
        else:
            bounds = f"at most {high}"
        shown = f"{number:g}" if isinstance(number, float) else _shown(number)
        raise ApiError.invalid(name, f"{name} must be {bounds}, got {shown}")


def _as_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ApiError.invalid(name, f"{name} must be a string, got {type(value).__name__}")
    return value


def _format_seconds(seconds: float) -> str:
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


def _pick_model(fields: dict[str, Any], models: dict[str, ServedModel]) -> ServedModel:
    if not _given(fields, "model"):
        if len(models) == 1:
            return next(iter(models.values()))
        raise ApiError.invalid(
            "model", f"model is required; this deployment serves {sorted(models)}", "missing"
        )
    name = _as_str("model", fields["model"])
    if name not in models:
        raise ApiError(
            404,
            f"The model '{name}' does not exist; this deployment serves {sorted(models)}",
            param="model",
            code="model_not_found",
        )
    return models[name]


def _prompt(name: str, value: Any, required: bool) -> str | None:
    if value is None:
        if required:
            raise ApiError.invalid(name, f"{name} is required", "missing")
        return None
    text = _as_str(name, value)
    if required and not text.strip():
        raise ApiError.invalid(name, f"{name} must not be empty", "empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise ApiError.invalid(
            name, f"{name} is {len(text)} characters long; at most {MAX_PROMPT_CHARS} allowed"
        )
    return text


def _size(fields: dict[str, Any], model: ServedModel) -> tuple[int, int]:
    text = _as_str("size", fields["size"]) if _given(fields, "size") else model.default_size
    match = _SIZE.match(text.strip())
    if match is None:
        raise ApiError.invalid(
            "size",
            f"size must be 'WIDTHxHEIGHT' in ASCII digits (e.g. '832x480'), got {_shown(text)}",
        )
    width, height = int(match[1]), int(match[2])
    problem = model.size_problem(width, height)
    if problem:
        raise ApiError.invalid("size", f"size {width}x{height}: {problem}")
    return width, height


def _frames(fields: dict[str, Any], model: ServedModel, fps: int) -> tuple[int, str]:
    """(num_frames, seconds as shown). num_frames wins; else seconds*fps rounded to the
    model's frame rule ``temporal_factor*k+1``; else the default duration, cut to the longest
    the model renders. The ``seconds`` shown is what is rendered: ``(num_frames - 1) / fps``,
    Wan's count (a first frame, then ``temporal_factor*k`` frames of motion: 81 frames at
    16 fps are 5 s), so the API never echoes a duration it did not render."""
    factor = model.temporal_factor
    longest = model.longest
    if _given(fields, "num_frames"):
        frames = _as_int("num_frames", fields["num_frames"], 1)
        if frames > longest:
            raise ApiError.invalid(
                "num_frames",
                f"num_frames {_shown(frames)} is above the maximum of {longest} for model "
                f"'{model.name}'",
            )
        if not model.frames_fit(frames):
            below = factor * ((frames - 1) // factor) + 1
            raise ApiError.invalid(
                "num_frames",
                f"num_frames must be {factor}*k+1 for model '{model.name}' "
                f"(e.g. {below} or {below + factor}), got {frames}",
            )
        return frames, _format_seconds((frames - 1) / fps)
    if _given(fields, "seconds"):
        seconds = _as_float("seconds", fields["seconds"])
        if seconds <= 0:
            raise ApiError.invalid("seconds", f"seconds must be positive, got {seconds:g}")
        frames = factor * math.floor(seconds * fps / factor + 0.5) + 1
        if frames > longest:
            raise ApiError.invalid(
                "seconds",
                f"seconds={seconds:g} at {fps} fps is {frames} frames; model '{model.name}' "
                f"renders at most {longest} frames "
                f"({_format_seconds((longest - 1) / fps)} s at {fps} fps)",
            )
        return frames, _format_seconds((frames - 1) / fps)
    frames = factor * math.floor(DEFAULT_SECONDS * fps / factor + 0.5) + 1
    frames = min(frames, longest)
    return frames, _format_seconds((frames - 1) / fps)


def _metadata(value: Any) -> dict[str, str]:
    if isinstance(value, str):  # a form field holding a JSON object
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, dict):
        raise ApiError.invalid("metadata", "metadata must be an object of string values")
    if len(value) > MAX_METADATA_KEYS:
        raise ApiError.invalid("metadata", f"metadata has more than {MAX_METADATA_KEYS} keys")
    for key, item in value.items():
        if not isinstance(key, str) or not key or len(key) > MAX_METADATA_KEY_CHARS:
            raise ApiError.invalid(
                "metadata", f"metadata keys must be 1..{MAX_METADATA_KEY_CHARS} characters"
            )
        if not isinstance(item, str) or len(item) > MAX_METADATA_VALUE_CHARS:
            raise ApiError.invalid(
                "metadata",
                f"metadata[{key}] must be a string of at most {MAX_METADATA_VALUE_CHARS} "
                "characters",
            )
    return dict(value)


def _image(fields: dict[str, Any], model: ServedModel) -> ReferenceImage | None:
    value = fields.get("input_reference")
    if value is None or value == "":
        if model.image_to_video:
            raise ApiError.invalid(
                "input_reference",
                f"model '{model.name}' is image-to-video: input_reference (an image) is required",
                "missing",
            )
        return None
    if not model.image_to_video:
        raise ApiError.invalid(
            "input_reference",
            f"model '{model.name}' is text-to-video: it takes no input_reference",
            "unsupported",
        )
    if isinstance(value, UploadedImage):
        return decode_image(value.data)
    if isinstance(value, dict):
        if value.get("file_id") is not None:
            raise ApiError.invalid(
                "input_reference", "input_reference.file_id is not supported; send the image"
            )
        value = value.get("image_url")
    if not isinstance(value, str):
        raise ApiError.invalid(
            "input_reference", "input_reference must be an image file or a data URL"
        )
    return decode_image(bytes_from_data_url(value))


def _distilled(
    fields: dict[str, Any], model: ServedModel, negative: str | None
) -> tuple[int, float]:
    """A DMD-distilled model renders in its fixed steps without guidance: a request that
    asks for other steps, a guidance scale or a negative prompt is refused, not ignored."""
    steps = model.distilled_steps
    assert steps is not None
    if _given(fields, "num_inference_steps"):
        asked = _as_int("num_inference_steps", fields["num_inference_steps"], 1, model.max_steps)
        if asked != steps:
            raise ApiError.invalid(
                "num_inference_steps",
                f"model '{model.name}' is distilled to {steps} steps; leave "
                f"num_inference_steps out or send {steps}",
                "unsupported",
            )
    if _given(fields, "guidance_scale"):
        scale = _as_float("guidance_scale", fields["guidance_scale"], *GUIDANCE_RANGE)
        if scale != 1.0:
            raise ApiError.invalid(
                "guidance_scale",
                f"model '{model.name}' is distilled without guidance; leave guidance_scale out "
                "or send 1",
                "unsupported",
            )
    if negative is not None:
        raise ApiError.invalid(
            "negative_prompt",
            f"model '{model.name}' is distilled without guidance: a negative prompt has no "
            "effect; leave it out",
            "unsupported",
        )
    return steps, 1.0


def validate_create(fields: dict[str, Any], models: dict[str, ServedModel]) -> VideoRequest:
    """Check every field; the first problem found becomes a 400 (404 for an unknown model)."""
    unknown = sorted(set(fields) - FIELDS)
    if unknown:
        raise ApiError.invalid(
            unknown[0],
            f"Unknown parameter: '{unknown[0]}'. Accepted: {', '.join(sorted(FIELDS))}",
            "unknown_parameter",
        )
    model = _pick_model(fields, models)
    if model.routing_problem:
        raise ApiError.invalid("model", model.routing_problem, "no_pool_can_run")
    prompt = _prompt("prompt", fields.get("prompt"), required=True)
    assert prompt is not None
    negative = _prompt("negative_prompt", fields.get("negative_prompt"), required=False)
    width, height = _size(fields, model)
    fps = _as_int("fps", fields["fps"], *FPS_RANGE) if _given(fields, "fps") else model.default_fps
    num_frames, seconds = _frames(fields, model, fps)
    if model.distilled_steps is not None:
        steps, guidance = _distilled(fields, model, negative)
    else:
        steps = (
            _as_int("num_inference_steps", fields["num_inference_steps"], 1, model.max_steps)
            if _given(fields, "num_inference_steps")
            else min(DEFAULT_STEPS, model.max_steps)
        )
        guidance = (
            _as_float("guidance_scale", fields["guidance_scale"], *GUIDANCE_RANGE)
            if _given(fields, "guidance_scale")
            else DEFAULT_GUIDANCE
        )
    guidance_2 = None
    if _given(fields, "guidance_scale_2"):
        if not model.two_experts:
            raise ApiError.invalid(
                "guidance_scale_2",
                f"model '{model.name}' has one expert: guidance_scale_2 applies to two-expert "
                "models (Wan2.2 A14B)",
                "unsupported",
            )
        guidance_2 = _as_float("guidance_scale_2", fields["guidance_scale_2"], *GUIDANCE_RANGE)
    seed = _as_int("seed", fields["seed"], 0, SEED_MAX) if _given(fields, "seed") else None
    metadata = _metadata(fields["metadata"]) if _given(fields, "metadata") else {}
    batch_id = None
    if _given(fields, "batch_id"):
        batch_id = _as_str("batch_id", fields["batch_id"]).strip() or None
    priority = (
        _as_int("priority", fields["priority"], *PRIORITY_RANGE)
        if _given(fields, "priority")
        else BATCH_DEFAULT_PRIORITY
        if batch_id is not None
        else 0
    )
    return VideoRequest(
        model=model,
        prompt=prompt,
        negative_prompt=negative,
        width=width,
        height=height,
        num_frames=num_frames,
        seconds=seconds,
        fps=fps,
        num_inference_steps=steps,
        guidance_scale=guidance,
        guidance_scale_2=guidance_2,
        seed=seed,
        priority=priority,
        metadata=metadata,
        batch_id=batch_id,
        image=_image(fields, model),
    )
