"""Choose an attention backend for a layer.

Order of precedence: a backend forced for the current model build (``FastVideoArgs.
attention_backend`` sets it while the loader constructs modules), then the environment
variable ``FASTVIDEO_ATTENTION_BACKEND`` (``fastvideo.envs``), then the first backend in the
layer's supported list that can run here. A backend asked for by name that cannot run is an
error, never a silent fallback; an ``opt_in`` backend (a sparse pattern) asked for by name
applies to the layers that list it, and the others choose automatically. Sliding-tile layers
read their tile and window the same way: those forced with the backend for the current
build, else defaults (the forced config lives in ``sta_mask``, below the backends, which
read it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from fastvideo import envs
from fastvideo.attention.backends.abstract import AttentionBackend, _Backend
from fastvideo.attention.backends.flash_attn import FlashAttnBackend
from fastvideo.attention.backends.sdpa import SDPABackend
from fastvideo.attention.backends.sliding_tile_attn import SlidingTileAttnBackend
from fastvideo.attention.sta_mask import SlidingTileConfig, forced_sliding_tile_config

ENV_VAR = envs.FASTVIDEO_ATTENTION_BACKEND.name

_BACKENDS: dict[_Backend, type[AttentionBackend]] = {
    _Backend.FLASH_ATTN: FlashAttnBackend,
    _Backend.TORCH_SDPA: SDPABackend,
    _Backend.SLIDING_TILE_ATTN: SlidingTileAttnBackend,
}

_forced_backend: _Backend | None = None


def backend_from_name(name: str | _Backend, source: str) -> _Backend:
    if isinstance(name, _Backend):
        return name
    try:
        return _Backend[name.strip().upper()]
    except KeyError:
        raise ValueError(
            f"{source}={name!r} is not an attention backend; choose from "
            f"{[b.name for b in _Backend]}"
        ) from None


@contextlib.contextmanager
def forced_attention_backend(
    name: str | _Backend | None, sliding_tile: SlidingTileConfig | None = None
) -> Iterator[None]:
    """Layers constructed inside use backend ``name`` (``None`` keeps automatic choice), and
    sliding-tile layers the tile and window of ``sliding_tile`` (``None``: the defaults)."""
    global _forced_backend
    saved = _forced_backend
    _forced_backend = (
        None if name is None else backend_from_name(name, "FastVideoArgs.attention_backend")
    )
    try:
        with forced_sliding_tile_config(sliding_tile):
            yield
    finally:
        _forced_backend = saved


def _requested_backend() -> tuple[_Backend | None, str]:
    if _forced_backend is not None:
        return _forced_backend, "FastVideoArgs.attention_backend"
    env_value = envs.FASTVIDEO_ATTENTION_BACKEND.get()
    if env_value is not None:
        return backend_from_name(env_value, ENV_VAR), ENV_VAR
    return None, ""


def get_attn_backend(supported: tuple[_Backend, ...]) -> type[AttentionBackend]:
    requested, source = _requested_backend()
    if requested is not None and requested not in supported and _BACKENDS[requested].opt_in:
        # A sparse pattern (sliding-tile) applies to the layers that can lay it, the video
        # self-attention; the others (cross-attention to text) keep the automatic choice.
        requested = None
    if requested is not None:
        if requested not in supported:
            raise ValueError(
                f"{source}={requested.name}: this layer supports only {[b.name for b in supported]}"
            )
        reason = _BACKENDS[requested].unavailable_reason()
        if reason is not None:
            raise ValueError(f"{source}={requested.name} cannot be used: {reason}")
        return _BACKENDS[requested]
    for candidate in supported:
        backend = _BACKENDS[candidate]
        if not backend.opt_in and backend.unavailable_reason() is None:
            return backend
    raise ValueError(
        f"none of the supported attention backends {[b.name for b in supported]} can run "
        f"here: {[f'{b.name}: {_BACKENDS[b].unavailable_reason()}' for b in supported]}"
    )
