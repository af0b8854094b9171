"""A pipeline stage: one job, takes the batch and returns it."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.pipelines.pipeline_batch_info import ForwardBatch


class PipelineStage(ABC):
    """Subclasses get their modules in ``__init__`` and implement ``forward``.

    Calling a stage runs ``forward`` and records its wall time in ``batch.stage_timings``
    under the stage's name, which is how per-stage timings reach users and benchmarks.
    """

    def __init__(self) -> None:
        self.stage_name = type(self).__name__

    def __call__(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        started = time.perf_counter()
        result = self.forward(batch, fastvideo_args)
        if not isinstance(result, ForwardBatch):
            raise TypeError(f"{self.stage_name}.forward must return the ForwardBatch")
        result.stage_timings[self.stage_name] = (
            result.stage_timings.get(self.stage_name, 0.0) + time.perf_counter() - started
        )
        return result

    @abstractmethod
    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch: ...
