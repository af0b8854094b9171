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

What the API must check before accepting a job (size and frame rules, whether an image is
required) is read from the model folder's config files, without loading any weights.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_TO_VIDEO_PIPELINES = {"WanImageToVideoPipeline"}


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
    spatial_multiple: int = 16
    temporal_factor: int = 4

    @property
    def image_to_video(self) -> bool:
        return self.pipeline_class in IMAGE_TO_VIDEO_PIPELINES

    @property
    def queue(self) -> str:
        return f"gpu.{self.pool}"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def _inspect_folder(path: Path) -> dict[str, Any]:
    index = _read_json(path / "model_index.json")
    if not index:
        raise ValueError(f"model folder {path} has no model_index.json")
    transformer = _read_json(path / "transformer" / "config.json")
    vae = _read_json(path / "vae" / "config.json")
    patch = transformer.get("patch_size", [1, 2, 2])
    spatial = int(vae.get("scale_factor_spatial", 8)) * max(int(patch[1]), int(patch[2]))
    return {
        "pipeline_class": index.get("_class_name", ""),
        "spatial_multiple": spatial,
        "temporal_factor": int(vae.get("scale_factor_temporal", 4)),
    }


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
    }
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
        models[name] = ServedModel(
            name=name, **{**entry, "path": folder}, **_inspect_folder(folder)
        )
    return models


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
