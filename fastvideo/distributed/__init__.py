"""Process groups and collectives.

Every layer reads its tensor-parallel and sequence-parallel coordinates from here, never
from ``torch.distributed`` directly, so one place decides how ranks are laid out.
"""

from fastvideo.distributed.communication_op import (
    cfg_model_parallel_all_gather,
    sequence_model_parallel_all_gather,
    sequence_model_parallel_all_to_all,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from fastvideo.distributed.parallel_state import (
    destroy_model_parallel,
    get_cfg_group,
    get_cfg_rank,
    get_cfg_world_size,
    get_sp_group,
    get_sp_rank,
    get_sp_world_size,
    get_tp_group,
    get_tp_rank,
    get_tp_world_size,
    get_world_rank,
    get_world_size,
    init_distributed_environment,
    initialize_model_parallel,
    model_parallel_is_initialized,
    tensor_parallel_coordinates,
)

__all__ = [
    "cfg_model_parallel_all_gather",
    "destroy_model_parallel",
    "get_cfg_group",
    "get_cfg_rank",
    "get_cfg_world_size",
    "get_sp_group",
    "get_sp_rank",
    "get_sp_world_size",
    "get_tp_group",
    "get_tp_rank",
    "get_tp_world_size",
    "get_world_rank",
    "get_world_size",
    "init_distributed_environment",
    "initialize_model_parallel",
    "model_parallel_is_initialized",
    "sequence_model_parallel_all_gather",
    "sequence_model_parallel_all_to_all",
    "tensor_model_parallel_all_gather",
    "tensor_model_parallel_all_reduce",
    "tensor_parallel_coordinates",
]
