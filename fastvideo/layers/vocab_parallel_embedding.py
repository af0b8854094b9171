"""Token embedding whose vocabulary rows are split across tensor-parallel ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastvideo.distributed.communication_op import (
    require_tp_group,
    tensor_model_parallel_all_reduce,
)
from fastvideo.distributed.parallel_state import get_tp_rank, get_tp_world_size


def pad_vocab_size(vocab_size: int, pad_to: int) -> int:
    return -(-vocab_size // pad_to) * pad_to


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous block of rows; ids outside it embed to zero and the
    ranks' partial embeddings are summed, so every rank ends with the full embedding.

    The vocabulary is padded to a multiple of ``padding_size * tp_size`` so all blocks are
    the same size; padded rows are never looked up.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        params_dtype: torch.dtype | None = None,
        padding_size: int = 64,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.prefix = prefix
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_world_size()
        padded = pad_vocab_size(num_embeddings, padding_size * self.tp_size)
        self.num_embeddings_padded = padded
        self.num_embeddings_per_partition = padded // self.tp_size
        self.vocab_start_index = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = min(
            self.vocab_start_index + self.num_embeddings_per_partition, num_embeddings
        )
        self.weight = nn.Parameter(
            torch.zeros(
                self.num_embeddings_per_partition,
                embedding_dim,
                dtype=params_dtype or torch.get_default_dtype(),
            )
        )
        nn.init.normal_(self.weight[: max(self.vocab_end_index - self.vocab_start_index, 0)])
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if (
            loaded_weight.shape[1:] != param.shape[1:]
            or loaded_weight.shape[0] < self.num_embeddings
        ):
            raise ValueError(
                f"{self.prefix or 'VocabParallelEmbedding'}: checkpoint has shape "
                f"{tuple(loaded_weight.shape)}, expected "
                f"({self.num_embeddings}, {self.embedding_dim})"
            )
        rows = self.vocab_end_index - self.vocab_start_index
        with torch.no_grad():
            param.zero_()
            if rows > 0:
                param[:rows].copy_(loaded_weight.narrow(0, self.vocab_start_index, rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        require_tp_group(self.tp_size)
        outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
        local_ids = (input_ids - self.vocab_start_index).masked_fill(outside, 0)
        output = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return tensor_model_parallel_all_reduce(output)

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
            f"tp_size={self.tp_size}"
        )
