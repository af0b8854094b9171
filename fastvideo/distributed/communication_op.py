"""Collectives over the tensor-, sequence- and CFG-parallel groups.

Each is the identity when its group has one rank, so single-process code pays nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastvideo.distributed.parallel_state import (
    get_cfg_group,
    get_cfg_world_size,
    get_sp_group,
    get_sp_world_size,
    get_tp_group,
    get_tp_world_size,
)


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


def _all_gather(x: torch.Tensor, dim: int, group, world_size: int) -> torch.Tensor:
    if group is None or world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    group = get_tp_group()
    if group is None or get_tp_world_size() == 1:
        return x
    dist.all_reduce(x, group=group)
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return _all_gather(x, dim, get_tp_group(), get_tp_world_size())


def sequence_model_parallel_all_gather(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    return _all_gather(x, dim, get_sp_group(), get_sp_world_size())


def cfg_model_parallel_all_gather(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return _all_gather(x, dim, get_cfg_group(), get_cfg_world_size())


def sequence_model_parallel_all_to_all(
    x: torch.Tensor, scatter_dim: int, gather_dim: int
) -> torch.Tensor:
    """Split ``x`` into sp chunks along ``scatter_dim``, send chunk i to SP rank i, and
    concatenate what arrives along ``gather_dim`` (Ulysses' head/sequence exchange)."""
    world_size, group = get_sp_world_size(), get_sp_group()
    if group is None or world_size == 1:
        return x
    inputs = [t.contiguous() for t in x.chunk(world_size, dim=scatter_dim)]
    outputs = [torch.empty_like(t) for t in inputs]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)
