"""Load one pipeline component (DiT, VAE, encoder, tokenizer, scheduler) from its folder.

Native modules (registered in ``fastvideo.models.registry`` and not themselves a
transformers/diffusers class) are built from their ``config.json`` and filled from safetensors
by parameter name. Everything else named in ``model_index.json`` by a supported library is
loaded by that library's ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastvideo.attention.selector import forced_attention_backend
from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.logger import init_logger
from fastvideo.models.loader.weight_utils import (
    WeightLoadingError,
    find_safetensors_files,
    iterate_safetensors,
    keep_modules_in_fp32,
    load_weights_into_model,
)
from fastvideo.models.registry import resolve_model_class, supported_class_names

logger = init_logger(__name__)

# Auxiliary components with no weights to port (tokenizers, image processors) are loaded by
# transformers itself; the suffix says which Auto class can stand in for a class name this
# transformers version lacks (e.g. CLIPImageProcessorPil, written by transformers 5).
_AUXILIARY_SUFFIXES = {
    "TokenizerFast": "AutoTokenizer",
    "Tokenizer": "AutoTokenizer",
    "ImageProcessorFast": "AutoImageProcessor",
    "ImageProcessorPil": "AutoImageProcessor",
    "ImageProcessor": "AutoImageProcessor",
}


def _auxiliary_loader(library: str, class_name: str):
    if library != "transformers":
        return None
    for suffix, auto_name in _AUXILIARY_SUFFIXES.items():
        if class_name.endswith(suffix):
            import transformers

            return getattr(transformers, class_name, None) or getattr(transformers, auto_name)
    return None


def _read_config(folder: Path, component: str) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"component '{component}': {folder} has no config.json")
    return json.loads(config_path.read_text())


def _constructor_kwargs(cls: type, config: dict, component: str) -> dict:
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ValueError(
                f"component '{component}': config.json has keys {unknown} that "
                f"{cls.__name__} does not know; this port cannot honour them"
            )
    return kwargs


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def _load_native(
    cls: type,
    folder: Path,
    component: str,
    dtype: torch.dtype,
    device: torch.device,
    args: FastVideoArgs,
) -> nn.Module:
    config = _read_config(folder, component)
    kwargs = _constructor_kwargs(cls, config, component)
    files = find_safetensors_files(folder, component)
    # Build directly on the target device in the target dtype: no second copy of the weights.
    try:
        with (
            forced_attention_backend(args.attention_backend, args.sliding_tile_config()),
            _default_dtype(dtype),
            device,
        ):
            model = cls(**kwargs)
    except (TypeError, ValueError) as err:
        # A ``**config`` constructor rejects an unknown config.json key with a TypeError; any
        # other TypeError is a bug, not bad input, and propagates as is.
        if isinstance(err, TypeError) and "unexpected keyword argument" not in str(err):
            raise
        # Name the component: the model's own message knows only its class.
        raise ValueError(
            f"component '{component}': cannot build {cls.__name__} from "
            f"{folder / 'config.json'}: {err}"
        ) from err
    keep_modules_in_fp32(model)
    load_weights_into_model(model, iterate_safetensors(files), component)
    return model.eval().requires_grad_(False)


def _load_library_model(
    cls: type, folder: Path, component: str, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    model, info = cls.from_pretrained(str(folder), dtype=dtype, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"}
    if problems:
        raise WeightLoadingError(f"component '{component}': checkpoint does not match: {problems}")
    return model.to(device).eval().requires_grad_(False)


def load_component(
    component: str, library: str, class_name: str, model_folder: Path, args: FastVideoArgs
) -> Any:
    folder = model_folder / component
    if not folder.is_dir():
        raise ValueError(
            f"component '{component}' ({library}.{class_name}) is listed in model_index.json "
            f"but {model_folder} has no '{component}' folder"
        )
    cls = resolve_model_class(class_name)
    if cls is not None:
        if _is_scheduler(cls):
            return cls.from_config(cls.load_config(str(folder)))
        dtype = args.precision_for(component)
        device = args.torch_device
        logger.info("loading %s (%s) in %s on %s", component, class_name, dtype, device)
        if issubclass(cls, nn.Module) and _is_library_class(cls):
            return _load_library_model(cls, folder, component, dtype, device)
        return _load_native(cls, folder, component, dtype, device, args)
    auxiliary = _auxiliary_loader(library, class_name)
    if auxiliary is not None:
        return auxiliary.from_pretrained(str(folder))
    raise ValueError(
        f"component '{component}': _class_name '{class_name}' (library '{library}') is not "
        f"supported; supported classes: {supported_class_names()}, and transformers "
        f"tokenizers and image processors"
    )


def _is_scheduler(cls: type) -> bool:
    from diffusers import SchedulerMixin

    return isinstance(cls, type) and issubclass(cls, SchedulerMixin)


def _is_library_class(cls: type) -> bool:
    """True for transformers/diffusers classes (they load themselves), False for our ports."""
    return cls.__module__.split(".")[0] in {"transformers", "diffusers"}
