"""Process groups and collectives.

Every layer reads its tensor-parallel and sequence-parallel coordinates from here, never
from ``torch.distributed`` directly, so one place decides how ranks are laid out.
"""

from fastvideo.distributed.communication_op import (
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from fastvideo.distributed.parallel_state import (
    get_sp_rank,
    get_sp_world_size,
    get_tp_group,
    get_tp_rank,
    get_tp_world_size,
    tensor_parallel_coordinates,
)

__all__ = [
    "get_sp_rank",
    "get_sp_world_size",
    "get_tp_group",
    "get_tp_rank",
    "get_tp_world_size",
    "tensor_model_parallel_all_gather",
    "tensor_model_parallel_all_reduce",
    "tensor_parallel_coordinates",
]
