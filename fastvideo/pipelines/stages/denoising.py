"""The denoising loop: DiT forward (twice under classifier-free guidance), scheduler step.

Across several ranks (``fastvideo.executor``) every rank runs this loop in lockstep:

- CFG-parallel (CFG world size 2): CFG rank 0 computes the conditional prediction, CFG rank
  1 the unconditional one, and one all-gather per step gives every rank both, so every rank
  combines them the same way and holds identical latents. Without guidance
  (``guidance_scale <= 1``) both halves compute the conditional prediction, with no
  collective: the redundant pass costs no wall time, as the halves run side by side.
- Stopping: only rank 0 has the step callback (the executor forwards it to the caller);
  after every step rank 0 broadcasts its stop decision, so every rank raises
  ``GenerationCancelled`` after the same step and the group stays in step for the next request.

With one rank this is the plain single-process loop.

Step caching (``FastVideoArgs.step_cache_threshold``): a fresh ``StepCache`` per request, with
separate state for the conditional and the unconditional branch (under CFG-parallel each rank
only ever sees its own branch). Its counters go to ``batch.extra["step_cache"]`` and stay on
``self.step_cache`` until the next request.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from fastvideo.distributed.communication_op import cfg_model_parallel_all_gather
from fastvideo.distributed.parallel_state import get_cfg_rank, get_cfg_world_size, get_world_size
from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.models.dits.step_cache import StepCache
from fastvideo.pipelines.pipeline_batch_info import ForwardBatch, GenerationCancelled, StepProgress
from fastvideo.pipelines.stages.base import PipelineStage
from fastvideo.utils.torch_utils import module_dtype

logger = logging.getLogger(__name__)


def broadcast_stop(stop: bool, device: torch.device) -> bool:
    """Rank 0's stop decision, on every rank (the identity on a single process)."""
    if get_world_size() == 1:
        return stop
    flag = torch.tensor([1 if stop else 0], dtype=torch.int32, device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


class DenoisingStage(PipelineStage):
    """``transformer_2`` and ``boundary_ratio`` (Wan2.2's two experts, as diffusers'
    ``WanPipeline`` runs them): steps at timesteps >= ``boundary_ratio *
    num_train_timesteps`` go to ``transformer`` (high noise) with ``guidance_scale``, the
    later ones to ``transformer_2`` (low noise) with ``guidance_scale_2``. Both experts stay
    where they were loaded (resident), so the switch costs nothing."""

    def __init__(self, transformer, scheduler, transformer_2=None, boundary_ratio=None) -> None:
        super().__init__()
        if (transformer_2 is None) != (boundary_ratio is None):
            raise ValueError("transformer_2 and boundary_ratio go together (Wan2.2's experts)")
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.boundary_ratio = boundary_ratio
        self.scheduler = scheduler
        self.step_cache: StepCache | None = None
        self._compiled_shapes: set[tuple[int, ...]] = set()

    def _expert(self, t: torch.Tensor, batch: ForwardBatch) -> tuple[str, float]:
        """Which expert runs at timestep ``t`` and with which guidance scale."""
        if self.transformer_2 is None:
            return "transformer", batch.guidance_scale
        boundary = self.boundary_ratio * self.scheduler.config.num_train_timesteps
        if t >= boundary:
            return "transformer", batch.guidance_scale
        low = batch.guidance_scale_2
        return "transformer_2", batch.guidance_scale if low is None else low

    def _predict(
        self, model_input, timestep, text, image, branch: str = "cond", expert: str = "transformer"
    ) -> torch.Tensor:
        kwargs = {"encoder_hidden_states_image": image} if image is not None else {}
        if self.step_cache is not None:
            # Each expert keeps its own cache state: one's residuals say nothing of the other.
            key = branch if expert == "transformer" else f"{branch}:{expert}"
            kwargs["step_cache"] = self.step_cache.branch(key)
        return getattr(self, expert)(
            hidden_states=model_input, timestep=timestep, encoder_hidden_states=text, **kwargs
        )

    def _guided_prediction(
        self, model_input, timestep, text, negative, image, guidance_scale, expert="transformer"
    ):
        if negative is None:
            return self._predict(model_input, timestep, text, image, expert=expert)
        if get_cfg_world_size() == 1:
            noise_pred = self._predict(model_input, timestep, text, image, expert=expert)
            noise_uncond = self._predict(
                model_input, timestep, negative, image, "uncond", expert=expert
            )
        else:
            conditional = get_cfg_rank() == 0
            mine = self._predict(
                model_input,
                timestep,
                text if conditional else negative,
                image,
                "cond" if conditional else "uncond",
                expert=expert,
            )
            # (B, ...) from each CFG rank -> (2B, ...): conditional first, then unconditional.
            noise_pred, noise_uncond = cfg_model_parallel_all_gather(mine, dim=0).chunk(2, dim=0)
        return noise_uncond + guidance_scale * (noise_pred - noise_uncond)

    def _report_first_compiled_step(self, latents: torch.Tensor, seconds: float) -> None:
        """Log the first step at each latent shape of a compiled DiT: it includes the compile."""
        shape = tuple(latents.shape)
        if shape not in self._compiled_shapes:
            self._compiled_shapes.add(shape)
            logger.info(
                "torch.compile: first step at latent %s took %.1f s (compile included; "
                "later steps and requests at this shape reuse it)",
                shape,
                seconds,
            )

    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        if batch.latents is None or batch.timesteps is None or batch.prompt_embeds is None:
            raise ValueError("DenoisingStage needs latents, timesteps and prompt_embeds")
        dtype = module_dtype(self.transformer)
        text = batch.prompt_embeds.to(dtype)
        negative = (
            batch.negative_prompt_embeds.to(dtype)
            if batch.do_classifier_free_guidance and batch.negative_prompt_embeds is not None
            else None
        )
        image = batch.image_embeds.to(dtype) if batch.image_embeds is not None else None
        latents = batch.latents
        num_steps = len(batch.timesteps)
        threshold = fastvideo_args.step_cache_threshold
        self.step_cache = StepCache(threshold, num_steps) if threshold is not None else None
        started = time.perf_counter()
        for index, t in enumerate(batch.timesteps):
            if self.step_cache is not None:
                self.step_cache.begin_step(index)
            model_input = latents
            if batch.condition_latents is not None:
                model_input = torch.cat([latents, batch.condition_latents], dim=1)
            model_input = model_input.to(dtype)
            timestep = t.expand(latents.shape[0])
            expert, guidance_scale = self._expert(t, batch)
            noise_pred = self._guided_prediction(
                model_input, timestep, text, negative, image, guidance_scale, expert
            )
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            stop = False
            if batch.callback is not None:
                progress = StepProgress(
                    index + 1, num_steps, float(t), time.perf_counter() - started
                )
                stop = bool(batch.callback(progress))
            if index == 0 and fastvideo_args.enable_torch_compile:
                self._report_first_compiled_step(latents, time.perf_counter() - started)
            if broadcast_stop(stop, latents.device):
                raise GenerationCancelled(f"stopped by the step callback after step {index + 1}")
        batch.latents = latents
        if self.step_cache is not None:
            batch.extra["step_cache"] = self.step_cache.counters
        return batch
