"""TeaCache-style step caching: skip the DiT's blocks at a denoising step whose input barely
changed since the last step, reusing the residual (blocks output minus blocks input) of the
last step that ran them. Off unless ``FastVideoArgs.step_cache_threshold`` is set.

Indicator: the timestep-modulated input of block 0, ``norm1(x) * (1 + scale) + shift`` (the
TeaCache paper's "timestep embedding modulated noisy input"). It depends on both the latents
and the timestep, and costs one LayerNorm. At each step the relative L1 change against the
previous step, ``sum|m - m_prev| / sum|m_prev|``, is added to an accumulator; while the
accumulator stays below the threshold the step reuses the cached residual, otherwise the
blocks run, the residual is stored and the accumulator goes back to 0. The first and last
steps always run. No polynomial rescaling: TeaCache's published Wan coefficients were fitted
to a different indicator (its Wan port uses the timestep embedding), per checkpoint, so they
would not carry over; the threshold here is in raw accumulated relative-L1 units.

State is kept per branch (``"cond"`` / ``"uncond"``): the two classifier-free-guidance passes
see different text, so their residuals differ and must not be mixed. A ``StepCache`` lives for
one request; the denoising stage builds a fresh one per request, so nothing leaks across.

Sequence parallel: each SP rank holds a slice of the tokens (the last ones zero padding), so
the two sums cover only this rank's real tokens and are all-reduced over the SP group: every
rank takes the same decision, the one a single process would take (up to summation order).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastvideo.distributed.parallel_state import get_sp_group, get_sp_rank, get_sp_world_size


@dataclass
class _BranchState:
    previous: torch.Tensor | None = None  # last step's indicator (this rank's real tokens)
    residual: torch.Tensor | None = None  # blocks output - input, last computed step
    accumulated: float = 0.0
    computed: int = 0
    skipped: int = 0


class StepCache:
    """Per-request step-skipping state for one DiT, one ``_BranchState`` per branch key.

    The denoising loop calls ``begin_step(index)`` before the step's forwards and passes
    ``branch(key)`` to each DiT forward.
    """

    def __init__(self, threshold: float, num_steps: int) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise ValueError(f"step cache threshold must be a number, got {threshold!r}")
        if not (math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"step cache threshold must be finite and >= 0, got {threshold}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be positive, got {num_steps}")
        self.threshold = float(threshold)
        self.num_steps = num_steps
        self.step_index = 0
        self._branches: dict[str, _BranchState] = {}

    def begin_step(self, index: int) -> None:
        self.step_index = index

    def branch(self, key: str) -> StepCacheBranch:
        return StepCacheBranch(self, self._branches.setdefault(key, _BranchState()))

    @property
    def counters(self) -> dict[str, dict[str, int]]:
        """Per branch: forwards that ran the blocks (``computed``) and that reused (``skipped``)."""
        return {
            key: {"computed": state.computed, "skipped": state.skipped}
            for key, state in self._branches.items()
        }

    @property
    def computed(self) -> int:
        return sum(state.computed for state in self._branches.values())

    @property
    def skipped(self) -> int:
        return sum(state.skipped for state in self._branches.values())


def _real_tokens(local_tokens: int, seq_len: int | None) -> int:
    """How many of this rank's ``local_tokens`` are real (not SP padding at the end)."""
    if seq_len is None:
        return local_tokens
    return max(0, min(local_tokens, seq_len - get_sp_rank() * local_tokens))


class StepCacheBranch:
    """One branch's view of a ``StepCache``, handed to the DiT forward."""

    def __init__(self, cache: StepCache, state: _BranchState) -> None:
        self._cache = cache
        self._state = state

    def _relative_change(self, indicator: torch.Tensor) -> float | None:
        previous = self._state.previous
        if previous is None or previous.shape != indicator.shape:
            return None
        sums = torch.stack(
            [(indicator - previous).abs().sum(), previous.abs().sum()]
        ).double()  # float64: the SP all-reduce and the single-process sum agree closely
        if get_sp_world_size() > 1:
            dist.all_reduce(sums, group=get_sp_group())
        numerator, denominator = sums.tolist()
        return numerator / denominator if denominator > 0 else math.inf

    def run(
        self,
        x: torch.Tensor,
        indicator: torch.Tensor,
        blocks: Callable[[torch.Tensor], torch.Tensor],
        seq_len: int | None = None,
    ) -> torch.Tensor:
        """``blocks(x)``, or ``x`` plus the cached residual when the step may be skipped.

        ``x`` / ``indicator``: (B, tokens, dim) on this rank; ``seq_len``: the global token
        count under sequence parallelism (None on one rank)."""
        cache, state = self._cache, self._state
        indicator = indicator[:, : _real_tokens(indicator.shape[1], seq_len)].float()
        change = self._relative_change(indicator)
        state.previous = indicator
        boundary = cache.step_index in (0, cache.num_steps - 1)
        if change is not None and not boundary and state.residual is not None:
            state.accumulated += change
            if state.accumulated < cache.threshold and state.residual.shape == x.shape:
                state.skipped += 1
                return x + state.residual
        out = blocks(x)
        state.residual = out - x
        state.accumulated = 0.0
        state.computed += 1
        return out
