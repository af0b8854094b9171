"""Linear layers that know how to hold one tensor-parallel slice of a full weight.

Each layer owns a ``weight_loader(param, loaded_weight, shard_id=None)`` that takes the
*full* checkpoint tensor and copies in the part this rank holds, so the model loader never
special-cases a layer type. Forwards return ``(output, output_bias)`` where ``output_bias`` is
the bias left for the caller to add (only with ``skip_bias_add=True``, else ``None``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastvideo.distributed.communication_op import (
    require_tp_group,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from fastvideo.distributed.parallel_state import get_tp_rank, get_tp_world_size


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(
            f"{what} ({numerator}) must be divisible by the tensor-parallel size ({denominator})"
        )
    return numerator // denominator


def _copy_checked(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    if param.shape != loaded.shape:
        raise ValueError(
            f"{name}: checkpoint slice has shape {tuple(loaded.shape)}, "
            f"layer expects {tuple(param.shape)}"
        )
    with torch.no_grad():
        param.copy_(loaded)


def _rank_slice(
    loaded: torch.Tensor, dim: int, full: int, start: int, size: int, name: str
) -> torch.Tensor:
    """``loaded.narrow(dim, start, size)`` after checking that ``loaded`` has the full,
    unsharded size ``full`` along ``dim``: a larger checkpoint tensor must not be silently
    truncated, nor a smaller one fail with an indexing error."""
    if loaded.ndim <= dim or loaded.shape[dim] != full:
        raise ValueError(
            f"{name}: checkpoint tensor has shape {tuple(loaded.shape)}, expected {full} "
            f"along dim {dim}"
        )
    return loaded.narrow(dim, start, size)


class LinearBase(nn.Module):
    def __init__(
        self,
        input_size: int,
        output_size: int,
        skip_bias_add: bool = False,
        params_dtype: torch.dtype | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.skip_bias_add = skip_bias_add
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.prefix = prefix
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_world_size()

    def _make_params(self, out_features: int, in_features: int, bias: bool) -> None:
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=self.params_dtype))
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=self.params_dtype))
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same init as nn.Linear so a freshly built layer is usable without a checkpoint.
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        if self.bias is not None:
            bound = 1 / self.weight.shape[1] ** 0.5 if self.weight.shape[1] else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def _linear(self, x: torch.Tensor, add_bias: bool) -> torch.Tensor:
        require_tp_group(self.tp_size)
        return F.linear(x, self.weight, self.bias if add_bias else None)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.input_size}, out_features={self.output_size}, "
            f"bias={self.bias is not None}, tp_size={self.tp_size}"
        )


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        skip_bias_add: bool = False,
        params_dtype: torch.dtype | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__(input_size, output_size, skip_bias_add, params_dtype, prefix)
        self._make_params(output_size, input_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        _copy_checked(param, loaded_weight, self.prefix or type(self).__name__)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        output = self._linear(x, add_bias=not self.skip_bias_add)
        return output, self.bias if self.skip_bias_add else None


class ColumnParallelLinear(LinearBase):
    """Y = XA with A split by columns (output features) across tensor-parallel ranks."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        gather_output: bool = False,
        skip_bias_add: bool = False,
        params_dtype: torch.dtype | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__(input_size, output_size, skip_bias_add, params_dtype, prefix)
        self.gather_output = gather_output
        self.output_size_per_partition = _divide(output_size, self.tp_size, "output_size")
        self._make_params(self.output_size_per_partition, input_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        shard = param.shape[0]
        name = self.prefix or type(self).__name__
        _copy_checked(
            param,
            _rank_slice(loaded_weight, 0, self.output_size, self.tp_rank * shard, shard, name),
            name,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        output = self._linear(x, add_bias=not self.skip_bias_add)
        if self.gather_output:
            output = tensor_model_parallel_all_gather(output, dim=-1)
        return output, self.bias if self.skip_bias_add else None


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs (e.g. gate and up, or key and value) in one matmul.

    Each rank holds its slice of *every* sub-output, so a checkpoint that stores the
    sub-weights separately loads with ``shard_id`` = the sub-output's index.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = True,
        gather_output: bool = False,
        skip_bias_add: bool = False,
        params_dtype: torch.dtype | None = None,
        prefix: str = "",
    ) -> None:
        self.output_sizes = list(output_sizes)
        self.shard_ids = tuple(range(len(self.output_sizes)))
        super().__init__(
            input_size, sum(output_sizes), bias, gather_output, skip_bias_add, params_dtype, prefix
        )
        for size in self.output_sizes:
            _divide(size, self.tp_size, "each of output_sizes")

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int | None = None
    ) -> None:
        name = self.prefix or type(self).__name__
        if shard_id is None:
            # A checkpoint that already stores the merged tensor: slice each part in turn.
            _rank_slice(loaded_weight, 0, sum(self.output_sizes), 0, 0, name)
            offset = 0
            for index, size in enumerate(self.output_sizes):
                self.weight_loader(param, loaded_weight.narrow(0, offset, size), index)
                offset += size
            return
        if not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard_id must be in [0, {len(self.output_sizes)}), got {shard_id}")
        shard = self.output_sizes[shard_id] // self.tp_size
        start = sum(self.output_sizes[:shard_id]) // self.tp_size
        name = f"{name}[{shard_id}]"
        _copy_checked(
            param.data.narrow(0, start, shard),
            _rank_slice(
                loaded_weight, 0, self.output_sizes[shard_id], self.tp_rank * shard, shard, name
            ),
            name,
        )


class QKVParallelLinear(ColumnParallelLinear):
    """Fused query/key/value projection; heads are split across tensor-parallel ranks."""

    shard_ids = ("q", "k", "v")

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int | None = None,
        bias: bool = True,
        skip_bias_add: bool = False,
        params_dtype: torch.dtype | None = None,
        prefix: str = "",
    ) -> None:
        self.hidden_size = hidden_size
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads or total_num_heads
        tp_size = get_tp_world_size()
        self.num_heads = _divide(total_num_heads, tp_size, "total_num_heads")
        self.num_kv_heads = _divide(self.total_num_kv_heads, tp_size, "total_num_kv_heads")
        output_size = (self.total_num_heads + 2 * self.total_num_kv_heads) * head_size
        super().__init__(hidden_size, output_size, bias, False, skip_bias_add, params_dtype, prefix)

    def _shard_sizes(self) -> dict[str, int]:
        return {
            "q": self.num_heads * self.head_size,
            "k": self.num_kv_heads * self.head_size,
            "v": self.num_kv_heads * self.head_size,
        }

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | None = None
    ) -> None:
        sizes = self._shard_sizes()
        layer = self.prefix or type(self).__name__
        if shard_id is None:
            totals = {name: size * self.tp_size for name, size in sizes.items()}
            _rank_slice(loaded_weight, 0, sum(totals.values()), 0, 0, layer)
            offset = 0
            for name in self.shard_ids:
                self.weight_loader(param, loaded_weight.narrow(0, offset, totals[name]), name)
                offset += totals[name]
            return
        if shard_id not in sizes:
            raise ValueError(f"shard_id must be one of {self.shard_ids}, got {shard_id!r}")
        shard = sizes[shard_id]
        start = 0
        for name in self.shard_ids[: self.shard_ids.index(shard_id)]:
            start += sizes[name]
        name = f"{layer}[{shard_id}]"
        _copy_checked(
            param.data.narrow(0, start, shard),
            _rank_slice(loaded_weight, 0, shard * self.tp_size, self.tp_rank * shard, shard, name),
            name,
        )


class RowParallelLinear(LinearBase):
    """Y = XA with A split by rows (input features); partial results are summed across ranks."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        input_is_parallel: bool = True,
        skip_bias_add: bool = False,
        params_dtype: torch.dtype | None = None,
        reduce_results: bool = True,
        prefix: str = "",
    ) -> None:
        super().__init__(input_size, output_size, skip_bias_add, params_dtype, prefix)
        self.input_is_parallel = input_is_parallel
        self.reduce_results = reduce_results
        self.input_size_per_partition = _divide(input_size, self.tp_size, "input_size")
        self._make_params(output_size, self.input_size_per_partition, bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        name = self.prefix or type(self).__name__
        if param.ndim == 1:  # the bias is added once, after the reduction: every rank keeps it all
            _copy_checked(param, loaded_weight, name)
            return
        shard = param.shape[1]
        _copy_checked(
            param,
            _rank_slice(loaded_weight, 1, self.input_size, self.tp_rank * shard, shard, name),
            name,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.input_is_parallel and self.tp_size > 1:
            shard = self.input_size_per_partition
            x = x.narrow(-1, self.tp_rank * shard, shard)
        add_bias = self.bias is not None and not self.skip_bias_add
        if self.tp_size == 1:
            output = self._linear(x, add_bias)
        else:
            # Partial sums are reduced first; the bias must be added once, not once per rank.
            require_tp_group(self.tp_size)
            output = F.linear(x, self.weight)
            if self.reduce_results:
                output = tensor_model_parallel_all_reduce(output)
            if add_bias:
                output = output + self.bias
        return output, self.bias if self.skip_bias_add else None
