"""The models a deployment serves, from one TOML file (``FVB_MODELS_CONFIG``).

```toml
[models."wan2.1-t2v-1.3b"]
path = "/models/Wan2.1-T2V-1.3B-Diffusers"   # local diffusers folder
pool = "default"          # GPU pool: the Celery queue gpu.<pool> its jobs go to
gpus = 1                  # GPUs per job
default_size = "832x480"
default_fps = 16
max_frames = 81
max_steps = 100
[models."wan2.1-t2v-1.3b".pipeline_options]   # FastVideoArgs fields for this model
dit_precision = "bf16"
```

What the API must check before accepting a job is read from the model folder's config
files, without loading any weights: the pipeline (whether an image is required), the VAE's
compression and the DiT's patch size (size multiples, the frame rule ``temporal_factor*k+1``)
and the DiT's rotary table (``rope_max_seq_len`` positions per axis of the latent grid in
patches: the largest width, height and frame count the model can place). A served model
whose own defaults break those rules is a config error at start-up, not a failed job.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_TO_VIDEO_PIPELINES = {"WanImageToVideoPipeline"}


#: A few-step DMD-distilled pipeline (``fastvideo/pipelines/wan_dmd``), its default steps.
DMD_PIPELINE = "WanDMDPipeline"
DMD_DEFAULT_STEPS = (1000, 757, 522)


@dataclass(frozen=True)
class ServedModel:
    name: str
    path: Path
    pool: str = "default"
    gpus: int = 1
    default_size: str = "832x480"
    default_fps: int = 16
    max_frames: int = 81
    max_steps: int = 100
    max_pixels: int = 1280 * 720
    pipeline_options: dict[str, Any] = field(default_factory=dict)
    # Read from the model folder.
    pipeline_class: str = ""
    #: Wan2.2's two experts (``transformer_2`` and ``boundary_ratio``): guidance_scale_2.
    two_experts: bool = False
    #: A DMD-distilled model's fixed steps (``WanDMDPipeline``), or None.
    distilled_steps: int | None = None
    spatial_multiple: int = 16
    temporal_factor: int = 4
    #: The DiT's patch size over the latent (frames, height, width).
    latent_patch: tuple[int, int, int] = (1, 2, 2)
    #: Positions of the DiT's rotary table per axis of the patch grid.
    rope_max_seq_len: int = 1024
    #: GPUs each worker of the model's pool owns (``[pools.<name>] gpus``); None: not said.
    pool_gpus: int | None = None

    @property
    def image_to_video(self) -> bool:
        return self.pipeline_class in IMAGE_TO_VIDEO_PIPELINES

    @property
    def routing_problem(self) -> str | None:
        """Why no worker can take this model's jobs, or None: a model that needs more GPUs
        per job than its pool's workers own would only fail at load time."""
        if self.pool_gpus and self.gpus > self.pool_gpus:  # 0: CPU workers run any on ranks
            return (
                f"model '{self.name}' needs {self.gpus} GPUs per job, but the workers of pool "
                f"'{self.pool}' own {self.pool_gpus} ([pools.{self.pool}] gpus in the models "
                "file): no pool can run it"
            )
        return None

    @property
    def max_side(self) -> int:
        """The largest width or height (pixels) the rotary table reaches."""
        return self.rope_max_seq_len * self.spatial_multiple

    def frames_fit(self, frames: int) -> bool:
        """``frames`` follows the frame rule and the latent frames fit the patch grid."""
        if frames < 1 or (frames - 1) % self.temporal_factor:
            return False
        latent = (frames - 1) // self.temporal_factor + 1
        return latent % self.latent_patch[0] == 0 and (
            latent // self.latent_patch[0] <= self.rope_max_seq_len
        )

    @property
    def longest(self) -> int:
        """The most frames a job may ask for: ``max_frames`` cut to the rules."""
        frames = self.temporal_factor * ((self.max_frames - 1) // self.temporal_factor) + 1
        while frames > 1 and not self.frames_fit(frames):
            frames -= self.temporal_factor
        return frames

    def size_problem(self, width: int, height: int) -> str | None:
        """Why this model cannot render ``width``x``height``, or None."""
        multiple = self.spatial_multiple
        if width <= 0 or height <= 0 or width % multiple or height % multiple:
            return (
                f"width and height must be positive multiples of {multiple} for model '{self.name}'"
            )
        if max(width, height) > self.max_side:
            return (
                f"model '{self.name}' renders at most {self.max_side} pixels per side (its "
                f"rotary table covers {self.rope_max_seq_len} patches of {multiple} px: "
                "rope_max_seq_len in transformer/config.json)"
            )
        if width * height > self.max_pixels:
            return (
                f"that is {width * height} pixels; model '{self.name}' allows at most "
                f"{self.max_pixels} (max_pixels)"
            )
        return None

    @property
    def queue(self) -> str:
        return f"gpu.{self.pool}"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def _inspect_folder(path: Path, chosen_pipeline: str | None = None) -> dict[str, Any]:
    """What the folder says the model can do (``chosen_pipeline``: the entry's
    ``pipeline_options.pipeline_class_name``, which overrides the folder's own class)."""
    index = _read_json(path / "model_index.json")
    if not index:
        raise ValueError(f"model folder {path} has no model_index.json")
    transformer = _read_json(path / "transformer" / "config.json")
    vae = _read_json(path / "vae" / "config.json")
    patch = tuple(int(p) for p in transformer.get("patch_size", [1, 2, 2]))
    spatial = int(vae.get("scale_factor_spatial", 8)) * max(patch[1], patch[2])
    pipeline_class = chosen_pipeline or index.get("_class_name", "")
    distilled = None
    if pipeline_class == DMD_PIPELINE:
        distilled = len(index.get("dmd_denoising_steps") or DMD_DEFAULT_STEPS)
    return {
        "pipeline_class": pipeline_class,
        "two_experts": index.get("boundary_ratio") is not None,
        "distilled_steps": distilled,
        "spatial_multiple": spatial,
        "temporal_factor": int(vae.get("scale_factor_temporal", 4)),
        "latent_patch": patch,
        "rope_max_seq_len": int(transformer.get("rope_max_seq_len", 1024)),
    }


def _fitting_default_size(model: ServedModel) -> str:
    """832x480 (Wan's 480p), cut down to what the model can place when it cannot."""
    width, height = (int(side) for side in ServedModel.default_size.split("x"))
    multiple = model.spatial_multiple
    width = max(multiple, min(width, model.max_side) // multiple * multiple)
    height = max(multiple, min(height, model.max_side) // multiple * multiple)
    return f"{width}x{height}"


def _check_defaults(path: Path, model: ServedModel) -> None:
    """The entry's own defaults must be renderable: a config error now, not failed jobs."""
    where = f"models config {path}: model {model.name!r}"
    width, _, height = model.default_size.partition("x")
    if not (width.isascii() and width.isdigit() and height.isascii() and height.isdigit()):
        raise ValueError(
            f"{where}: default_size must be 'WIDTHxHEIGHT', got {model.default_size!r}"
        )
    problem = model.size_problem(int(width), int(height))
    if problem:
        raise ValueError(f"{where}: default_size {model.default_size}: {problem}")
    if model.max_frames < 1 or model.longest < 1 or not model.frames_fit(model.longest):
        raise ValueError(f"{where}: max_frames={model.max_frames} allows no frame count")


def load_models_config(path: Path) -> dict[str, ServedModel]:
    if not path.is_file():
        raise ValueError(f"models config {path} does not exist (set FVB_MODELS_CONFIG)")
    document = tomllib.loads(path.read_text())
    entries = document.get("models", {})
    if not entries:
        raise ValueError(f"models config {path} defines no [models.<name>] table")
    known = {f for f in ServedModel.__dataclass_fields__} - {
        "name",
        "pipeline_class",
        "spatial_multiple",
        "temporal_factor",
        "latent_patch",
        "rope_max_seq_len",
        "pool_gpus",
    }
    pools = _pools(path, document.get("pools", {}))
    models = {}
    for name, entry in entries.items():
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError(f"models config {path}: model {name!r} has unknown keys {unknown}")
        if "path" not in entry:
            raise ValueError(f"models config {path}: model {name!r} needs a 'path'")
        folder = Path(entry["path"]).expanduser()
        if not folder.is_absolute():
            folder = (path.parent / folder).resolve()
        pool_gpus = pools.get(entry.get("pool", "default"))
        chosen = (entry.get("pipeline_options") or {}).get("pipeline_class_name")
        model = ServedModel(
            name=name,
            **{**entry, "path": folder},
            **_inspect_folder(folder, chosen),
            pool_gpus=pool_gpus,
        )
        if "default_size" not in entry:
            model = dataclasses.replace(model, default_size=_fitting_default_size(model))
        _check_defaults(path, model)
        models[name] = model
    return models


def _pools(path: Path, tables: dict[str, Any]) -> dict[str, int]:
    """``[pools.<name>] gpus = N``: the GPUs every worker of that pool owns."""
    pools = {}
    for name, table in tables.items():
        unknown = sorted(set(table) - {"gpus"})
        gpus = table.get("gpus")
        if unknown or isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
            raise ValueError(
                f"models config {path}: [pools.{name}] takes one key, gpus = a count >= 0 "
                f"(0: CPU workers), got {table!r}"
            )
        pools[name] = gpus
    return pools


def pool_gpus(path: Path, pool: str) -> int | None:
    """What the models file says the workers of ``pool`` own (None: nothing, or no file)."""
    if not path.is_file():
        return None
    return _pools(path, tomllib.loads(path.read_text()).get("pools", {})).get(pool)


def write_models_config(path: Path, models: dict[str, dict[str, Any]]) -> None:
    """Write a minimal config (used by ``fvb up`` for the demo model)."""
    lines = []
    for name, entry in models.items():
        lines.append(f'[models."{name}"]')
        for key, value in entry.items():
            lines.append(f"{key} = {json.dumps(str(value) if isinstance(value, Path) else value)}")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
