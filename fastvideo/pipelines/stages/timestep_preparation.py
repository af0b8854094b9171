"""Ask the scheduler for the timesteps of this run."""

from __future__ import annotations

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.pipelines.pipeline_batch_info import ForwardBatch
from fastvideo.pipelines.stages.base import PipelineStage


class TimestepPreparationStage(PipelineStage):
    def __init__(self, scheduler) -> None:
        super().__init__()
        self.scheduler = scheduler

    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        self.scheduler.set_timesteps(batch.num_inference_steps, device=fastvideo_args.torch_device)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        batch.timesteps = self.scheduler.timesteps
        return batch
