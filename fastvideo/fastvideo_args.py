"""Engine-wide settings: where the model is, which device and precisions, which kernels."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from fastvideo.attention.selector import backend_from_name
from fastvideo.attention.sta_mask import SlidingTileConfig

PRECISIONS: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

# On GPU, the precisions diffusers' Wan model cards load each component in: the DiT and the
# text encoder in bf16, the VAE and the CLIP image encoder in fp32 (they are small and
# sensitive). On CPU everything is fp32.
_GPU_DEFAULT_PRECISION = {
    "transformer": "bf16",
    "text_encoder": "bf16",
    "vae": "fp32",
    "image_encoder": "fp32",
}


@dataclass
class FastVideoArgs:
    model_path: str
    #: Pipeline class to run instead of the one ``model_index.json`` names.
    pipeline_class_name: str | None = None
    #: "cuda", "cuda:1", "cpu"; default: CUDA when available.
    device: str | None = None
    #: Ranks one request runs on. More than 1 starts that many long-lived rank processes
    #: (``fastvideo.executor``): ``num_gpus = sp_size * (2 if cfg_parallel else 1)``.
    num_gpus: int = 1
    #: Sequence-parallel ranks per CFG branch; None: ``num_gpus // (2 if cfg_parallel else 1)``.
    sp_size: int | None = None
    #: Tensor-parallel degree of the text encoder (contiguous blocks of ranks; divides num_gpus).
    tp_size: int = 1
    #: Split classifier-free guidance: half of the ranks compute the conditional prediction,
    #: the other half the unconditional one.
    cfg_parallel: bool = False
    #: Seconds any collective between ranks may take before it fails instead of hanging. The
    #: other ranks wait for rank 0 while the caller's step callback runs, so a callback must
    #: return well within it.
    dist_timeout_s: float = 600.0
    #: Per-component precision ("fp32", "bf16", "fp16"); None picks the default above.
    dit_precision: str | None = None
    vae_precision: str | None = None
    text_encoder_precision: str | None = None
    image_encoder_precision: str | None = None
    #: Force an attention backend by name (e.g. "TORCH_SDPA"); None chooses automatically.
    attention_backend: str | None = None
    #: Sliding-tile attention (attention_backend="SLIDING_TILE_ATTN"): tile size in latent
    #: tokens (t, h, w), and window in tiles per axis (odd: (3, 3, 3) reaches one tile on
    #: each side, clipped at the borders).
    sta_tile: tuple[int, int, int] = (6, 8, 8)
    sta_window: tuple[int, int, int] = (3, 3, 3)
    #: TeaCache-style step caching of the DiT (``fastvideo/models/dits/step_cache.py``): a
    #: step whose accumulated relative change of the modulated input stays below this reuses
    #: the last computed residual instead of running the blocks. None (default): off; 0.0
    #: runs every step. Larger is faster and further from the uncached output.
    step_cache_threshold: float | None = None
    #: Compile the DiT's transformer blocks with ``torch.compile`` (``fastvideo.models.
    #: compile``): the first step at each resolution pays the compile (about a minute for
    #: Wan2.1), every later step runs faster than eager.
    enable_torch_compile: bool = False
    #: Extra per-pipeline options, read by the pipelines that know them.
    pipeline_options: dict = field(default_factory=dict)

    @classmethod
    def from_kwargs(cls, model_path: str, **kwargs: object) -> FastVideoArgs:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"unknown FastVideoArgs field(s) {unknown}; known fields: {sorted(known)}"
            )
        args = cls(model_path=model_path, **kwargs)  # type: ignore[arg-type]
        args.validate()
        return args

    def validate(self) -> None:
        for name in (
            "dit_precision",
            "vae_precision",
            "text_encoder_precision",
            "image_encoder_precision",
        ):
            value = getattr(self, name)
            if value is not None and value not in PRECISIONS:
                raise ValueError(
                    f"{name}={value!r} is not a precision; choose from {list(PRECISIONS)}"
                )
        self._validate_layout()
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"device={self.device!r} is not a torch device string") from None
        if self.attention_backend is not None:
            backend_from_name(self.attention_backend, "attention_backend")
        if not isinstance(self.enable_torch_compile, bool):
            raise ValueError(
                f"enable_torch_compile must be True or False, got {self.enable_torch_compile!r}"
            )
        threshold = self.step_cache_threshold
        if threshold is not None and (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
            or not math.isfinite(threshold)
            or threshold < 0
        ):
            raise ValueError(
                f"step_cache_threshold must be None or a finite number >= 0, got {threshold!r}"
            )
        sliding_tile = self.sliding_tile_config()
        self.sta_tile, self.sta_window = sliding_tile.tile, sliding_tile.window

    def sliding_tile_config(self) -> SlidingTileConfig:
        """``sta_tile`` / ``sta_window`` as the attention layers take them (validated)."""
        return SlidingTileConfig(tile=self.sta_tile, window=self.sta_window)

    def _validate_layout(self) -> None:
        """num_gpus = sp_size x (2 if cfg_parallel else 1), and tp_size divides num_gpus
        (the layout ``fastvideo.distributed.parallel_state`` builds)."""
        if not isinstance(self.cfg_parallel, bool):
            raise ValueError(f"cfg_parallel must be True or False, got {self.cfg_parallel!r}")
        for name in ("num_gpus", "sp_size", "tp_size"):
            value = getattr(self, name)
            if name == "sp_size" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        cfg = 2 if self.cfg_parallel else 1
        if self.num_gpus % cfg:
            raise ValueError(
                f"cfg_parallel=True needs an even num_gpus (one half per guidance branch), "
                f"got num_gpus={self.num_gpus}"
            )
        if self.sp_size is None:
            self.sp_size = self.num_gpus // cfg
        if self.sp_size * cfg != self.num_gpus:
            raise ValueError(
                f"sp_size={self.sp_size} does not fit num_gpus={self.num_gpus}: num_gpus must "
                f"equal sp_size x {cfg} (cfg_parallel={self.cfg_parallel}); use "
                f"sp_size={self.num_gpus // cfg}"
            )
        if self.num_gpus % self.tp_size:
            raise ValueError(
                f"tp_size={self.tp_size} must divide num_gpus={self.num_gpus} (tensor-parallel "
                "groups are contiguous blocks of ranks)"
            )
        timeout = self.dist_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ValueError(f"dist_timeout_s must be a positive number, got {timeout!r}")

    @property
    def torch_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def precision_for(self, component: str) -> torch.dtype:
        """The dtype a pipeline component (``transformer``, ``vae``, ...) is loaded in."""
        explicit = {
            "transformer": self.dit_precision,
            "vae": self.vae_precision,
            "text_encoder": self.text_encoder_precision,
            "image_encoder": self.image_encoder_precision,
        }.get(component)
        if explicit is not None:
            return PRECISIONS[explicit]
        if self.torch_device.type == "cpu":
            return torch.float32
        return PRECISIONS[_GPU_DEFAULT_PRECISION.get(component, "fp32")]
