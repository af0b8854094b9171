"""Collectives over the tensor-parallel group; the identity when it has one rank."""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastvideo.distributed.parallel_state import get_tp_group, get_tp_world_size


def require_tp_group(layer_tp_size: int) -> dist.ProcessGroup | None:
    """The group a layer built for ``layer_tp_size`` ranks must reduce over.

    A layer sliced offline (``tensor_parallel_coordinates``) has no group: running it would
    silently compute a partial result, so it is an error instead.
    """
    group = get_tp_group()
    if layer_tp_size > 1 and group is None:
        raise RuntimeError(
            f"this layer holds 1/{layer_tp_size} of its weights but no tensor-parallel "
            "process group is initialised; layers sliced offline cannot run a forward"
        )
    return group


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    group = get_tp_group()
    if group is None or get_tp_world_size() == 1:
        return x
    dist.all_reduce(x, group=group)
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    group = get_tp_group()
    world_size = get_tp_world_size()
    if group is None or world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
