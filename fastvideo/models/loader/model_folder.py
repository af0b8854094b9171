"""Find a diffusers-format model folder and read its ``model_index.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path


def resolve_model_path(model_path: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a Hugging Face repo id looked up in the local cache.

    The cache is tried first without the network; a download is attempted only when the
    network is allowed (``HF_HUB_OFFLINE`` unset). Any failure is one clear ``ValueError``.
    """
    path = Path(model_path).expanduser()
    if path.is_dir():
        return path
    text = str(model_path)
    if path.exists():
        raise ValueError(f"model_path={text!r} is a file; expected a diffusers model folder")
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise ValueError(
            f"model_path={text!r} is not an existing folder and not a Hugging Face repo id "
            "('org/name')"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, local_files_only=True))
    except Exception as cached_err:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
            raise ValueError(
                f"model_path={text!r}: not a local folder and not in the Hugging Face cache "
                f"(HF_HUB_OFFLINE is set, so nothing is downloaded): {cached_err}"
            ) from None
        try:
            return Path(snapshot_download(text))
        except Exception as err:
            raise ValueError(
                f"model_path={text!r}: not a local folder, not in the Hugging Face cache, and "
                f"downloading it failed ({type(err).__name__}: {err})"
            ) from None


def read_model_index(folder: Path) -> dict:
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ValueError(
            f"model_path={str(folder)!r} has no model_index.json; expected a diffusers-format "
            "pipeline folder"
        )
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{index_path}: not valid JSON ({err})") from None
    if not isinstance(index, dict) or "_class_name" not in index:
        raise ValueError(f"{index_path}: missing the '_class_name' of the pipeline")
    return index


def component_specs(index: dict) -> dict[str, tuple[str, str]]:
    """``{component: (library, class_name)}`` for the entries that name a component."""
    specs = {}
    for name, value in index.items():
        if name.startswith("_"):
            continue
        if isinstance(value, list) and len(value) == 2 and all(value):
            specs[name] = (value[0], value[1])
    return specs
