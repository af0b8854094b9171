"""The native UMT5 encoder computes what transformers' ``UMT5EncoderModel`` computes: from its
state dict, on padded batches, split across tensor-parallel ranks, and loaded from a saved
Wan pipeline folder by the engine's loader."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.models.encoders.umt5 import UMT5EncoderModel, relative_position_buckets
from fastvideo.models.loader.component_loader import load_component
from fastvideo.models.loader.weight_utils import keep_modules_in_fp32, load_weights_into_model
from fastvideo.testing.distributed import run_on_ranks

# The tiny Wan text encoder; a wider one whose heads * d_kv != d_model, with a vocabulary that
# TP pads unevenly and sequences long enough for the logarithmic buckets; a non-gated ReLU one.
CONFIGS = {
    "tiny-wan": dict(
        vocab_size=73, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
    ),
    "8-heads-3-layers": dict(
        vocab_size=101, d_model=24, d_kv=6, d_ff=40, num_layers=3, num_heads=8,
        relative_attention_num_buckets=32, relative_attention_max_distance=20,
    ),
    "relu-not-gated": dict(
        vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2,
        relative_attention_num_buckets=16, relative_attention_max_distance=16,
        feed_forward_proj="relu",
    ),
}  # fmt: skip
SEQ_LEN = 40
LENGTHS = (40, 23, 6)  # one unpadded sequence, two padded ones


def _transformers_model(config: dict, attn_implementation: str = "sdpa"):
    from transformers import UMT5Config
    from transformers import UMT5EncoderModel as ReferenceUMT5

    torch.manual_seed(0)
    model = ReferenceUMT5(UMT5Config(**config)).eval()
    model.set_attn_implementation(attn_implementation)
    with torch.no_grad():  # transformers initialises the norms to 1: make them matter
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    return model


def _config_json(reference) -> dict:
    """What the engine's loader passes: config.json minus the private ``_`` keys."""
    return {k: v for k, v in reference.config.to_dict().items() if not k.startswith("_")}


def _native(reference, dtype: torch.dtype = torch.float32) -> UMT5EncoderModel:
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as the loader builds it
    try:
        model = UMT5EncoderModel(**_config_json(reference))
    finally:
        torch.set_default_dtype(saved)
    keep_modules_in_fp32(model)
    load_weights_into_model(model, reference.state_dict().items(), "text_encoder")
    return model.eval()


def _batch(
    vocab_size: int, lengths: tuple[int, ...] = LENGTHS, seq_len: int = SEQ_LEN
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, vocab_size, (len(lengths), seq_len), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
        ids[row, length:] = 0  # the pad token
    return ids, mask


def _max_diffs(
    ours: torch.Tensor, theirs: torch.Tensor, lengths: tuple[int, ...] = LENGTHS
) -> tuple[float, float]:
    """(max |diff| at real tokens, max |diff| at padded positions)."""
    real = torch.zeros(ours.shape[:2], dtype=torch.bool)
    for row, length in enumerate(lengths):
        real[row, :length] = True
    diff = (ours.float() - theirs.float()).abs().cpu()
    return diff[real].max().item(), diff[~real].max().item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_transformers_umt5_at_real_and_padded_positions(name):
    reference = _transformers_model(CONFIGS[name])
    ours = _native(reference)
    ids, mask = _batch(reference.config.vocab_size)
    with torch.no_grad():
        expected = reference(ids, mask).last_hidden_state
        got = ours(ids, mask).last_hidden_state
        unmasked = ours(ids).last_hidden_state
    real, padded = _max_diffs(got, expected)
    print(f"{name}: max |diff| real {real:.2e}, padded {padded:.2e}")
    assert got.shape == (len(LENGTHS), SEQ_LEN, reference.config.d_model)
    assert expected.std() > 0.1
    assert real <= 1e-5
    # Padded positions are computed the same way (they attend to the real tokens), so they
    # match too; the text-encoding stage zeroes them afterwards.
    assert padded <= 1e-5
    # The mask is honoured: without it the padded rows' real tokens see the pad tokens.
    assert (unmasked[1, : LENGTHS[1]] - expected[1, : LENGTHS[1]]).abs().max() > 1e-3
    torch.testing.assert_close(unmasked[0], expected[0], rtol=0, atol=1e-5)


def test_matches_transformers_eager_attention_which_adds_the_mask_to_the_bias():
    # Eager attention adds the dtype's minimum to the bias instead of replacing it: the same
    # softmax, up to rounding.
    reference = _transformers_model(CONFIGS["8-heads-3-layers"], attn_implementation="eager")
    ours = _native(reference)
    ids, mask = _batch(reference.config.vocab_size)
    with torch.no_grad():
        real, padded = _max_diffs(
            ours(ids, mask).last_hidden_state, reference(ids, mask).last_hidden_state
        )
    print(f"eager: max |diff| real {real:.2e}, padded {padded:.2e}")
    assert max(real, padded) <= 1e-5


@pytest.mark.parametrize(
    ("num_buckets", "max_distance", "length"), [(8, 32, 40), (32, 20, 40), (32, 128, 512)]
)
def test_relative_position_buckets_match_transformers(num_buckets, max_distance, length):
    from transformers import UMT5Config
    from transformers.models.umt5.modeling_umt5 import UMT5Attention

    config = UMT5Config(
        relative_attention_num_buckets=num_buckets, relative_attention_max_distance=max_distance
    )
    attention = UMT5Attention(config, has_relative_attention_bias=True)
    position = torch.arange(length)
    expected = attention._relative_position_bucket(position[None, :] - position[:, None])
    got = relative_position_buckets(length, num_buckets, max_distance)
    assert torch.equal(got, expected)
    # Every bucket is reached but "distance 0, key after the query", which cannot happen.
    assert got.unique().numel() == num_buckets - 1


@pytest.mark.parametrize(("dtype", "wo_dtype"), [(torch.bfloat16, None), (torch.float16, "fp32")])
def test_half_precision_matches_transformers_and_keeps_wo_in_fp32_only_for_fp16(dtype, wo_dtype):
    reference = _transformers_model(CONFIGS["tiny-wan"])
    ours = _native(reference, dtype)
    # transformers keeps ``wo`` in float32 for float16 loads only (``_keep_in_fp32_modules``).
    half = _transformers_model(CONFIGS["tiny-wan"]).to(dtype)
    if wo_dtype:
        for name, param in half.named_parameters():
            if ".wo." in name:
                param.data = reference.get_parameter(name).data.clone()
    wo = {p.dtype for n, p in ours.named_parameters() if ".wo." in n}
    others = {p.dtype for n, p in ours.named_parameters() if ".wo." not in n}
    assert wo == {torch.float32 if wo_dtype else dtype}
    assert others == {dtype}
    ids, mask = _batch(reference.config.vocab_size)
    with torch.no_grad():
        got = ours(ids, mask).last_hidden_state
        expected = half(ids, mask).last_hidden_state
    assert got.dtype == expected.dtype == dtype
    real, padded = _max_diffs(got, expected)
    print(f"{dtype}: max |diff| real {real:.2e}, padded {padded:.2e}")
    # Same ops in the same order: on the CPU the results are equal; allow one half-precision
    # rounding of the largest output for other kernels.
    assert real <= expected.abs().max().item() * 2**-8


def tp_forward_on_rank(config: dict, state: dict, ids: torch.Tensor, mask: torch.Tensor):
    """Rank function for ``run_on_ranks``: build the encoder sliced for this rank, load the
    full checkpoint, encode. Returns the output and the sizes this rank holds."""
    model = UMT5EncoderModel(**config)
    load_weights_into_model(model, state.items(), "text_encoder")
    with torch.no_grad():
        out = model.eval()(ids, mask).last_hidden_state
    block = model.encoder.block[0]
    held = {
        "qkv": tuple(block.layer[0].SelfAttention.qkv.weight.shape),
        "bias": tuple(block.layer[0].SelfAttention.relative_attention_bias.weight.shape),
        "wi": tuple(block.layer[1].DenseReluDense.wi.weight.shape),
        "vocab_rows": model.shared.weight.shape[0],
    }
    return out, held


@pytest.mark.parametrize("tp_size", [2, 4])
def test_tensor_parallel_ranks_match_the_single_process_output(tp_size):
    reference = _transformers_model(CONFIGS["8-heads-3-layers"])
    ours = _native(reference)
    ids, mask = _batch(reference.config.vocab_size)
    with torch.no_grad():
        single = ours(ids, mask).last_hidden_state
    per_rank = run_on_ranks(
        tp_forward_on_rank,
        world_size=tp_size,
        args=(_config_json(reference), reference.state_dict(), ids, mask),
        tp_size=tp_size,
    )
    heads, d_kv, d_ff = 8 // tp_size, 6, 40 // tp_size
    for rank, (out, held) in enumerate(per_rank):
        diff = (out - single).abs().max().item()
        print(f"TP={tp_size} rank {rank}: max |diff| vs single process {diff:.2e}")
        assert diff <= 1e-5
        # Each rank really holds only its slice.
        assert held["qkv"] == (3 * heads * d_kv, 24)
        assert held["bias"] == (32, heads)
        assert held["wi"] == (2 * d_ff, 24)
        assert held["vocab_rows"] * tp_size >= 101 > held["vocab_rows"]


def test_loads_from_a_saved_wan_folder_through_the_component_loader(tiny_t2v):
    from transformers import AutoTokenizer
    from transformers import UMT5EncoderModel as ReferenceUMT5

    folder = Path(tiny_t2v)
    args = FastVideoArgs(model_path=tiny_t2v, device="cpu")
    ours = load_component("text_encoder", "transformers", "UMT5EncoderModel", folder, args)
    assert isinstance(ours, UMT5EncoderModel)
    reference = ReferenceUMT5.from_pretrained(folder / "text_encoder").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    tokens = tokenizer(
        ["a cat and a dog baking a cake", "the quick brown fox jumps over the lazy dog at sunset"],
        padding="max_length",
        max_length=24,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        got = ours(tokens.input_ids, tokens.attention_mask).last_hidden_state
        expected = reference(tokens.input_ids, tokens.attention_mask).last_hidden_state
    diff = (got - expected).abs().max().item()
    print(f"loaded from folder: max |diff| {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        (dict(is_decoder=True), "is_decoder"),
        (dict(model_type="t5"), "model_type"),
        (dict(scalable_attention=False), "scalable_attention"),
        (dict(pruned_heads={"0": [1]}), "pruned_heads"),
        (dict(feed_forward_proj="gated-gelu-fast"), "feed_forward_proj"),
        (dict(feed_forward_proj="gated-mish"), "feed_forward_proj"),
        (dict(dense_act_fn="mish"), "dense_act_fn"),
    ],
)
def test_config_settings_that_change_the_math_are_rejected_by_name(setting, field):
    config = {**CONFIGS["tiny-wan"], **setting}
    with pytest.raises(ValueError, match=field):
        UMT5EncoderModel(**config)


def test_config_keys_that_do_not_change_the_encoder_are_accepted():
    model = UMT5EncoderModel(
        **CONFIGS["tiny-wan"],
        architectures=["UMT5EncoderModel"],
        dtype="bfloat16",
        transformers_version="4.48.0",
        tie_word_embeddings=False,
        num_decoder_layers=24,
        use_cache=True,
        tokenizer_class="T5Tokenizer",
        scalable_attention=True,
    )
    assert len(model.encoder.block) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_on_cuda_matches_transformers_at_wan_sequence_length():
    config = dict(
        vocab_size=1000, d_model=256, d_kv=32, d_ff=640, num_layers=4, num_heads=8,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
    )  # fmt: skip
    lengths = (512, 77)  # Wan pads every prompt to 512 tokens
    ids, mask = (t.cuda() for t in _batch(config["vocab_size"], lengths, seq_len=512))
    reference = _transformers_model(config)
    ours = _native(reference, torch.bfloat16).cuda()
    with torch.no_grad():
        exact = reference.cuda()(ids, mask).last_hidden_state  # float32, no TF32 by default
        half = _transformers_model(config).to("cuda", torch.bfloat16)
        expected = half(ids, mask).last_hidden_state
        got = ours(ids, mask).last_hidden_state
    real, padded = _max_diffs(got, expected, lengths)
    largest = expected.abs().max().item()
    ulp = 2.0 ** (math.floor(math.log2(largest)) - 7)  # bf16 spacing at the largest output
    ours_error = (got.float() - exact).abs().mean().item()
    their_error = (expected.float() - exact).abs().mean().item()
    print(
        f"bf16 CUDA: max |diff| real {real:.2e}, padded {padded:.2e} ({real / ulp:.1f} ulp); "
        f"mean |bf16 - fp32|: ours {ours_error:.2e}, transformers {their_error:.2e}"
    )
    # With the same mask layout the kernels agree bit for bit; transformers releases that pass
    # SDPA a non-contiguous (head-innermost) bias get another kernel path, one bf16 rounding
    # apart per attention, which four layers compound to a few units in the last place.
    assert real <= 4 * ulp
    # No systematic error: ours is as close to the float32 result as transformers' bf16 is.
    assert ours_error <= 1.25 * their_error
