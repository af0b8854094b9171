"""The typed job record: its states, its batch's states, and its parameters.

:class:`JobParams` is ``Job.params``: what validation writes, what the worker reads and what
the API shows, spelled once. It is stored as JSON (:meth:`JobParams.to_json`) and read back
with :meth:`JobParams.from_json`; a field a producer did not record reads as None (rows
written by tests or older producers), and the worker passes only recorded fields on.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


#: The states a job never leaves.
FINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
#: The states of a job still to finish.
UNFINISHED_STATUSES = frozenset(set(JobStatus) - FINAL_STATUSES)


class BatchStatus(enum.StrEnum):
    """Stored states of a batch (the API derives in_progress/completed/cancelling from its
    videos' states)."""

    OPEN = "open"
    CANCELLED = "cancelled"


#: The fields ``VideoGenerator.generate_video`` takes as they are.
_GENERATION_FIELDS = (
    "negative_prompt",
    "height",
    "width",
    "num_frames",
    "num_inference_steps",
    "guidance_scale",
    "guidance_scale_2",
    "seed",
    "fps",
)


@dataclass(frozen=True)
class JobParams:
    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    #: A two-expert model's low-noise guidance scale (Wan2.2); None: ``guidance_scale``.
    guidance_scale_2: float | None = None
    #: Picked at submission when the client gave none, so every attempt draws the same noise.
    seed: int | None = None
    fps: int | None = None
    #: The duration the API shows: what is rendered, ``(num_frames - 1) / fps``.
    seconds: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    #: Image-to-video only: the RGB PNG the API stored (``inputs/<job_id>/image.png``).
    input_image_key: str | None = None

    @classmethod
    def from_json(cls, document: dict[str, Any] | None) -> JobParams:
        """Read ``Job.params``; ValueError naming the field when one has the wrong type."""
        document = dict(document or {})
        prompt = document.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError(f"params.prompt must be a string, got {type(prompt).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for name, value in document.items():
            if name not in known or value is None:
                continue  # a key a newer producer added is not ours to refuse
            values[name] = _checked(name, value)
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        document = dataclasses.asdict(self)
        # Fields only some models take are stored only when given.
        for name in ("input_image_key", "guidance_scale_2"):
            if document[name] is None:
                del document[name]
        return document

    def generation_kwargs(self) -> dict[str, Any]:
        """``generate_video`` keyword arguments: the prompt and every recorded field."""
        kwargs = {name: getattr(self, name) for name in _GENERATION_FIELDS}
        return {"prompt": self.prompt, **{k: v for k, v in kwargs.items() if v is not None}}

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}" if self.width and self.height else ""

    @property
    def shown_seconds(self) -> str:
        if self.seconds is not None:
            return str(self.seconds)
        if self.num_frames and self.fps:  # a producer that did not record the duration
            return f"{(self.num_frames - 1) / self.fps:.3f}".rstrip("0").rstrip(".")
        return ""

    @property
    def work(self) -> float:
        """Estimated GPU work: frames x pixels x steps (x2 with classifier-free guidance).
        Relative only: it weighs one tenant's queue against another's."""
        frames = self.num_frames or 1
        pixels = (self.width or 1) * (self.height or 1)
        steps = self.num_inference_steps or 1
        guided = 2 if (self.guidance_scale or 0) > 1 else 1
        return float(frames * pixels * steps * guided)


_TYPES: dict[str, tuple[type, ...]] = {
    "negative_prompt": (str,),
    "width": (int,),
    "height": (int,),
    "num_frames": (int,),
    "num_inference_steps": (int,),
    "guidance_scale": (int, float),
    "guidance_scale_2": (int, float),
    "seed": (int,),
    "fps": (int,),
    "seconds": (str, int, float),
    "metadata": (dict,),
    "input_image_key": (str,),
}


def _checked(name: str, value: Any) -> Any:
    types = _TYPES.get(name)
    if types is not None and (isinstance(value, bool) or not isinstance(value, types)):
        raise ValueError(f"params.{name} has the wrong type ({type(value).__name__})")
    if name in ("guidance_scale", "guidance_scale_2"):
        return float(value)
    if name == "seconds":
        return str(value)
    return value


@dataclass(frozen=True)
class JobResult:
    """``Job.result``: what the worker recorded of the render it stored (the manifest's
    columns that only the worker knows). Written once, by the attempt that succeeded."""

    frames: int | None = None
    fps: int | None = None
    width: int | None = None
    height: int | None = None
    #: sha256 over the model folder's ``model_index.json`` and component configs (first 16
    #: hex digits): which weights rendered it.
    model_revision: str | None = None
    gpu_name: str | None = None

    @classmethod
    def from_json(cls, document: dict[str, Any] | None) -> JobResult:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (document or {}).items() if k in known})

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
