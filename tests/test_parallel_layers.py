"""Parallel layers: each rank's weight_loader takes its slice of the full checkpoint, and the
slices put back together give the unsharded layer's output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastvideo.distributed import tensor_parallel_coordinates
from fastvideo.layers.activation import get_act_fn
from fastvideo.layers.layernorm import RMSNorm
from fastvideo.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from fastvideo.layers.vocab_parallel_embedding import VocabParallelEmbedding

WORLD = 4


def _ranks(build):
    layers = []
    for rank in range(WORLD):
        with tensor_parallel_coordinates(rank, WORLD):
            layers.append(build())
    return layers


def test_column_parallel_ranks_concatenate_to_full_output():
    torch.manual_seed(0)
    weight, bias, x = torch.randn(16, 6), torch.randn(16), torch.randn(3, 6)
    outputs = []
    for layer in _ranks(lambda: ColumnParallelLinear(6, 16, bias=True, gather_output=False)):
        layer.weight.weight_loader(layer.weight, weight)
        layer.bias.weight_loader(layer.bias, bias)
        outputs.append(F.linear(x, layer.weight, layer.bias))
    assert outputs[0].shape == (3, 4)
    torch.testing.assert_close(torch.cat(outputs, -1), F.linear(x, weight, bias))


def test_row_parallel_partial_sums_add_to_full_output_with_bias_once():
    torch.manual_seed(0)
    weight, bias, x = torch.randn(5, 8), torch.randn(5), torch.randn(3, 8)
    partials = []
    for rank, layer in enumerate(_ranks(lambda: RowParallelLinear(8, 5, bias=True))):
        layer.weight.weight_loader(layer.weight, weight)
        layer.bias.weight_loader(layer.bias, bias)
        torch.testing.assert_close(layer.weight.data, weight[:, rank * 2 : rank * 2 + 2])
        partials.append(F.linear(x[:, rank * 2 : rank * 2 + 2], layer.weight))
    torch.testing.assert_close(sum(partials) + bias, F.linear(x, weight, bias))


def test_qkv_parallel_rank_holds_its_heads_of_q_k_and_v():
    torch.manual_seed(0)
    heads, head_size, hidden = 4, 3, 10
    q, k, v = (torch.randn(heads * head_size, hidden) for _ in range(3))
    for rank, layer in enumerate(
        _ranks(lambda: QKVParallelLinear(hidden, head_size, heads, bias=False))
    ):
        for shard_id, full in zip("qkv", (q, k, v), strict=True):
            layer.weight.weight_loader(layer.weight, full, shard_id)
        rows = slice(rank * head_size, (rank + 1) * head_size)
        expected = torch.cat([q[rows], k[rows], v[rows]])
        torch.testing.assert_close(layer.weight.data, expected)


def test_qkv_single_rank_loads_fused_or_separate_checkpoints_identically():
    torch.manual_seed(0)
    q, k, v = (torch.randn(12, 10) for _ in range(3))
    separate = QKVParallelLinear(10, 3, 4, bias=False)
    for shard_id, full in zip("qkv", (q, k, v), strict=True):
        separate.weight.weight_loader(separate.weight, full, shard_id)
    fused = QKVParallelLinear(10, 3, 4, bias=False)
    fused.weight.weight_loader(fused.weight, torch.cat([q, k, v]))
    torch.testing.assert_close(separate.weight.data, fused.weight.data)
    torch.testing.assert_close(separate.weight.data, torch.cat([q, k, v]))


def test_merged_column_parallel_slices_each_sub_output():
    torch.manual_seed(0)
    gate, up = torch.randn(8, 5), torch.randn(8, 5)
    for rank, layer in enumerate(_ranks(lambda: MergedColumnParallelLinear(5, [8, 8], bias=False))):
        layer.weight.weight_loader(layer.weight, gate, 0)
        layer.weight.weight_loader(layer.weight, up, 1)
        rows = slice(rank * 2, rank * 2 + 2)
        torch.testing.assert_close(layer.weight.data, torch.cat([gate[rows], up[rows]]))


def test_replicated_linear_rejects_a_checkpoint_of_the_wrong_shape():
    layer = ReplicatedLinear(4, 3)
    with pytest.raises(ValueError, match=r"shape \(3, 5\).*expects \(3, 4\)"):
        layer.weight.weight_loader(layer.weight, torch.randn(3, 5))


def test_parallel_sizes_must_divide_by_tensor_parallel_size():
    with tensor_parallel_coordinates(0, 3), pytest.raises(ValueError, match="output_size"):
        ColumnParallelLinear(4, 16)


def test_vocab_parallel_embedding_ranks_sum_to_full_lookup():
    torch.manual_seed(0)
    table = torch.randn(10, 4)
    ids = torch.tensor([[0, 3, 9, 5]])
    total = torch.zeros(1, 4, 4)
    for layer in _ranks(lambda: VocabParallelEmbedding(10, 4, padding_size=1)):
        layer.weight.weight_loader(layer.weight, table)
        outside = (ids < layer.vocab_start_index) | (ids >= layer.vocab_end_index)
        local = (ids - layer.vocab_start_index).masked_fill(outside, 0)
        total += F.embedding(local, layer.weight).masked_fill(outside[..., None], 0)
    torch.testing.assert_close(total, F.embedding(ids, table))


def test_forward_without_a_process_group_fails_clearly():
    with tensor_parallel_coordinates(0, 2):
        layer = RowParallelLinear(4, 2)
    with pytest.raises(RuntimeError, match="no tensor-parallel process group"):
        layer(torch.randn(1, 2))


def test_rms_norm_matches_torch_in_fp32():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16)
    ours, ref = RMSNorm(16, eps=1e-6), torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-6)


def test_activation_names_resolve_and_unknown_is_an_error():
    x = torch.linspace(-3, 3, 11)
    torch.testing.assert_close(get_act_fn("gelu-approximate")(x), F.gelu(x, approximate="tanh"))
    torch.testing.assert_close(get_act_fn("silu")(x), F.silu(x))
    with pytest.raises(ValueError, match="not supported"):
        get_act_fn("swishy")
