"""Every ``FASTVIDEO_*`` environment variable the engine reads, declared once, here.

Each variable is a typed :class:`EnvVar` with its default and a line on what it does; code
reads it with ``envs.NAME.get()`` at the moment it needs the value (so a test, or a caller,
may set the variable after ``import fastvideo``), never with ``os.environ`` directly (a test
checks). ``fastvideo/README.md`` lists them. Variables other tools own (``RANK``,
``WORLD_SIZE``, ``HF_HUB_OFFLINE``, ``TORCHDYNAMO_DISABLE``, ...) are read where they are used.

The standard library only: every engine module may import this one.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class EnvVar(Generic[T]):
    """One environment variable: ``get()`` is ``default`` while it is unset or empty, else
    ``parse(value)`` (which raises ``ValueError`` naming the variable on a bad value)."""

    name: str
    type: str  # what the value is, for the docs
    default: T
    parse: Callable[[str, str], T]  # (name, raw value) -> value
    doc: str

    def get(self) -> T:
        raw = os.environ.get(self.name, "").strip()
        return self.default if not raw else self.parse(self.name, raw)


def _str(name: str, raw: str) -> str:
    return raw


def _upper(name: str, raw: str) -> str:
    return raw.upper()


def _flag(name: str, raw: str) -> bool:
    """Off for 0, false, no, off (any case); on for anything else."""
    return raw.lower() not in ("0", "false", "no", "off")


@functools.cache
def _json_object(name: str, raw: str) -> dict[str, Any]:
    # Cached per value: read on every call of a kernel. Callers copy before changing it.
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{name} is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object")
    return value


FASTVIDEO_ATTENTION_BACKEND: EnvVar[str | None] = EnvVar(
    "FASTVIDEO_ATTENTION_BACKEND",
    "backend name",
    None,
    _str,
    "Attention backend by name (FLASH_ATTN, TORCH_SDPA, SLIDING_TILE_ATTN; any case) for the "
    "layers that support it, when FastVideoArgs.attention_backend is not set; unset: each "
    "layer's first backend that can run here.",
)
FASTVIDEO_FLEX_KERNEL_OPTIONS: EnvVar[dict[str, Any] | None] = EnvVar(
    "FASTVIDEO_FLEX_KERNEL_OPTIONS",
    "JSON object",
    None,
    _json_object,
    'FlexAttention kernel_options for sliding-tile attention on CUDA, e.g. {"BLOCK_M": 128, '
    '"BLOCK_N": 64, "num_warps": 8} (python -m bench.sta_kernel times candidates); unset: '
    "default_kernel_options for the GPU and block sizes.",
)
FASTVIDEO_FUSED_KERNELS: EnvVar[bool] = EnvVar(
    "FASTVIDEO_FUSED_KERNELS",
    "flag",
    True,
    _flag,
    "0 turns off the one-pass Triton kernels of the DiT's and the VAE's elementwise steps "
    "(fastvideo/layers/fused_ops.py), leaving the PyTorch chain.",
)
FASTVIDEO_LOG_LEVEL: EnvVar[str] = EnvVar(
    "FASTVIDEO_LOG_LEVEL",
    "logging level",
    "WARNING",
    _upper,
    "Level of the engine's 'fastvideo' loggers (DEBUG, INFO, WARNING, ERROR), read when the "
    "first engine logger is made.",
)

#: Every variable above, in the order fastvideo/README.md lists them.
ALL: tuple[EnvVar[Any], ...] = (
    FASTVIDEO_ATTENTION_BACKEND,
    FASTVIDEO_FLEX_KERNEL_OPTIONS,
    FASTVIDEO_FUSED_KERNELS,
    FASTVIDEO_LOG_LEVEL,
)
