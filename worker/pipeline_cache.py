"""Loaded pipelines, kept warm across jobs: an LRU of ``VideoGenerator`` by model name.

A model with ``gpus > 1`` is loaded as a multi-rank ``VideoGenerator``: ``gpus`` long-lived
rank processes on this worker's GPU group (the first ``gpus`` of ``CUDA_VISIBLE_DEVICES``),
or CPU ranks over gloo with ``--device cpu``, laid out by the model's ``pipeline_options``
(``sp_size``, ``tp_size``, ``cfg_parallel``). The ranks stay up while the model is cached and
are stopped when it is evicted or the worker exits.

Each loaded model also has its revision (:func:`model_revision`, computed at load), which
the worker records with every video the model renders and which keys its prompt embeddings.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fvb_core.models_config import ServedModel

if TYPE_CHECKING:
    from fastvideo import VideoGenerator

log = logging.getLogger(__name__)


def model_revision(path: str | os.PathLike) -> str:
    """Which model a folder holds, as the first 16 hex digits of a sha256 over the files that
    describe it, not its weights: ``model_index.json`` and every component's JSON
    (``transformer/config.json``, ``scheduler/scheduler_config.json``, the tokenizer's files;
    not the ``*.index.json`` maps of sharded weights), each with its relative path, in path
    order. A folder given as a Hugging Face repo id is looked up as the engine does."""
    from fastvideo.models.loader.model_folder import resolve_model_path

    folder = resolve_model_path(path)
    components = sorted(
        (f for f in folder.glob("*/*.json") if not f.name.endswith(".index.json")),
        key=lambda f: f.relative_to(folder).as_posix(),
    )
    files = [folder / "model_index.json", *components]
    digest = hashlib.sha256()
    for file in files:
        data = file.read_bytes()
        digest.update(f"{file.relative_to(folder).as_posix()}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()[:16]


class PipelineCache:
    """At most ``size`` pipelines in memory; the least recently used one is dropped first.

    Used from one thread (the one running jobs), so it needs no lock.
    """

    def __init__(self, size: int, device: str | None = None, gpus: str | None = None) -> None:
        if size < 1:
            raise ValueError(f"pipeline cache size must be >= 1, got {size}")
        self.size = size
        self.device = device
        #: The worker's GPU group ("0,1,2,3"), or None (CPU, or every visible GPU).
        self.gpus = gpus
        self._entries: OrderedDict[str, tuple[ServedModel, VideoGenerator]] = OrderedDict()
        #: How many times each model was loaded by this process (1 when the cache works).
        self.loads: Counter[str] = Counter()
        #: model name -> (its folder, model_revision of it), computed when it was loaded.
        self._revisions: dict[str, tuple[Path, str]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        """The models loaded now, least recently used first."""
        return list(self._entries)

    def engine_kwargs(self, model: ServedModel) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(model.pipeline_options)
        if self.device is not None:
            kwargs["device"] = self.device
        declared = kwargs.get("num_gpus", model.gpus)
        if declared != model.gpus:
            raise ValueError(
                f"model {model.name!r}: pipeline_options.num_gpus={declared!r} contradicts "
                f"gpus={model.gpus}; set gpus only"
            )
        group = [g for g in (self.gpus or "").split(",") if g.strip()]
        on_gpu = self.device is None or not self.device.startswith("cpu")
        if on_gpu and group and model.gpus > len(group):
            raise ValueError(
                f"model {model.name!r} needs gpus={model.gpus} but this worker owns "
                f"{len(group)} (--gpus {self.gpus})"
            )
        kwargs["num_gpus"] = model.gpus
        return kwargs

    def revision(self, model: ServedModel) -> str:
        """The model's :func:`model_revision`, as computed when it was loaded (computed now
        if it was not loaded here)."""
        known = self._revisions.get(model.name)
        if known is None or known[0] != Path(model.path):
            known = (Path(model.path), model_revision(model.path))
            self._revisions[model.name] = known
        return known[1]

    def get(self, model: ServedModel) -> VideoGenerator:
        entry = self._entries.get(model.name)
        # A config reload that changed the model's folder or options means a fresh load.
        if entry is not None and entry[0] == model:
            self._entries.move_to_end(model.name)
            return entry[1]
        if entry is not None:
            self._drop(model.name)
        from fastvideo import VideoGenerator

        started = time.perf_counter()
        generator = VideoGenerator.from_pretrained(model.path, **self.engine_kwargs(model))
        self.loads[model.name] += 1
        self._revisions.pop(model.name, None)  # the folder's configs as they are now
        revision = self.revision(model)
        executor = getattr(generator, "executor", None)
        log.info(
            "pipeline loaded: model=%s path=%s revision=%s pid=%d seconds=%.2f loads=%d ranks=%s",
            model.name,
            model.path,
            revision,
            os.getpid(),
            time.perf_counter() - started,
            self.loads[model.name],
            executor.pids if executor is not None else "-",
        )
        self._entries[model.name] = (model, generator)
        while len(self._entries) > self.size:
            self._drop(next(iter(self._entries)))
        return generator

    def close(self) -> None:
        """Drop every pipeline (stopping the rank processes of multi-rank ones)."""
        for name in list(self._entries):
            self._drop(name)

    def _drop(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        self._revisions.pop(name, None)
        if entry is not None:
            entry[1].close()
        log.info("pipeline evicted: model=%s pid=%d", name, os.getpid())
        gc.collect()
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
