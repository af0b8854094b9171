"""Base class of every pipeline: load the components it needs, then run its stages in order."""

from __future__ import annotations

import contextlib
import functools
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from fastvideo.distributed.parallel_state import tensor_parallel_coordinates
from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.models.compile import compile_blocks
from fastvideo.models.loader.component_loader import load_component
from fastvideo.models.loader.model_folder import component_specs, read_model_index
from fastvideo.pipelines.pipeline_batch_info import ForwardBatch
from fastvideo.pipelines.stages.base import PipelineStage


class ComposedPipelineBase(ABC):
    """Subclasses list ``_required_config_modules`` and build stages in
    ``create_pipeline_stages`` with ``add_stage(stage_name=..., stage=...)``; modules come
    from ``get_module(name)``. A stage added as ``"denoising_stage"`` is also reachable as
    ``pipeline.denoising_stage``.
    """

    _required_config_modules: list[str] = []
    #: Components loaded when ``model_index.json`` names them (Wan2.2's ``transformer_2``).
    _optional_config_modules: list[str] = []
    #: Components built as tensor-parallel shards over the TP group (see
    #: ``fastvideo.distributed.parallel_state``); every other one is built whole on each rank.
    #: The TP groups are blocks of the SP/CFG ranks, which already split the DiT's tokens or
    #: guidance branches, so only a component whose inputs are the same across a TP group
    #: (the text encoder) may shard its weights over it.
    _tensor_parallel_modules: tuple[str, ...] = ("text_encoder",)
    #: Modules whose transformer blocks ``FastVideoArgs.enable_torch_compile`` compiles.
    _compiled_modules: tuple[str, ...] = ("transformer", "transformer_2")

    def __init__(
        self,
        model_path: str | Path,
        fastvideo_args: FastVideoArgs,
        loaded_modules: dict[str, Any] | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.fastvideo_args = fastvideo_args
        self._stages: list[PipelineStage] = []
        self._stage_names: list[str] = []
        self.modules: dict[str, Any] = (
            dict(loaded_modules)
            if loaded_modules is not None
            else self.load_modules(fastvideo_args)
        )
        self.initialize_pipeline(fastvideo_args)
        self.create_pipeline_stages(fastvideo_args)

    @functools.cached_property
    def model_index(self) -> dict:
        """The folder's ``model_index.json``, read once (loading and the stages both ask)."""
        return read_model_index(self.model_path)

    @property
    def required_config_modules(self) -> list[str]:
        return self._required_config_modules

    def load_modules(self, fastvideo_args: FastVideoArgs) -> dict[str, Any]:
        index = self.model_index
        self.validate_model_index(index)
        specs = component_specs(index)
        missing = [name for name in self.required_config_modules if name not in specs]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs components {missing} but "
                f"{self.model_path / 'model_index.json'} lists only {sorted(specs)}"
            )
        modules = {}
        wanted = self.required_config_modules + [
            name for name in self._optional_config_modules if name in specs
        ]
        for name in wanted:
            sharded = name in self._tensor_parallel_modules
            with contextlib.nullcontext() if sharded else tensor_parallel_coordinates(0, 1):
                modules[name] = load_component(name, *specs[name], self.model_path, fastvideo_args)
        if fastvideo_args.enable_torch_compile:
            for name in self._compiled_modules:
                if name in modules:
                    compile_blocks(modules[name])
        return modules

    def validate_model_index(self, index: dict) -> None:
        """Hook: reject a model folder this pipeline cannot run, before loading anything."""

    def get_module(self, module_name: str, default_value: Any = None) -> Any:
        return self.modules.get(module_name, default_value)

    def add_stage(self, stage_name: str, stage: PipelineStage) -> None:
        if stage_name in self._stage_names:
            raise ValueError(f"{type(self).__name__}: a stage named {stage_name!r} already exists")
        stage.stage_name = stage_name
        self._stages.append(stage)
        self._stage_names.append(stage_name)
        setattr(self, stage_name, stage)

    @property
    def stages(self) -> list[PipelineStage]:
        return list(self._stages)

    def initialize_pipeline(self, fastvideo_args: FastVideoArgs) -> None:
        """Hook for pipeline-specific set-up after the modules are loaded."""

    @abstractmethod
    def create_pipeline_stages(self, fastvideo_args: FastVideoArgs) -> None: ...

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        for stage in self._stages:
            batch = stage(batch, fastvideo_args)
        return batch
