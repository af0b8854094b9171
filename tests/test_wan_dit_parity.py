"""Parity of fastvideo's Wan2.1 DiT with diffusers' WanTransformer3DModel (CPU, tiny configs).

The reference gets random weights, ours is built from its config and loaded from its
state_dict through the project loader (so ``param_names_mapping`` is exercised too).
"""

import pytest
import torch
from diffusers import WanTransformer3DModel as DiffusersWanDiT

from fastvideo.distributed.parallel_state import tensor_parallel_coordinates
from fastvideo.models.dits.wanvideo import TEXT_CONTEXT_LENGTH, WanTransformer3DModel
from fastvideo.models.loader.weight_utils import load_weights_into_model

TOL = 1e-5

_BASE = {"in_channels": 4, "out_channels": 4, "freq_dim": 16, "rope_max_seq_len": 64}
CONFIGS = {
    # one head, head_dim 12 -> rotary split (4, 4, 4); odd freq_dim pads the sinusoids
    "heads1_dim12": dict(_BASE, num_attention_heads=1, attention_head_dim=12, text_dim=16,
                         ffn_dim=24, num_layers=1, freq_dim=15, cross_attn_norm=True),
    # rotary split (4, 2, 2); no cross-attention norm; out_channels=None means in_channels
    "heads2_dim8": dict(_BASE, num_attention_heads=2, attention_head_dim=8, text_dim=24,
                        ffn_dim=40, num_layers=2, cross_attn_norm=False, out_channels=None),
    # rotary split (6, 4, 4) (head_dim not divisible by 6); qk_norm=None (diffusers still
    # normalises q and k)
    "heads3_dim14_qknone": dict(_BASE, num_attention_heads=3, attention_head_dim=14,
                                text_dim=20, ffn_dim=32, num_layers=3, qk_norm=None,
                                in_channels=5, out_channels=3),
    # a temporal patch of 2 as well
    "heads2_patch222": dict(_BASE, patch_size=(2, 2, 2), num_attention_heads=2,
                            attention_head_dim=10, text_dim=16, ffn_dim=24, num_layers=2),
    # Wan2.1 I2V: CLIP image tokens through image_embedder, extra K/V in cross-attention
    "i2v": dict(_BASE, num_attention_heads=2, attention_head_dim=8, text_dim=16, ffn_dim=32,
                num_layers=2, image_dim=12, added_kv_proj_dim=16, in_channels=9),
    # first/last-frame variant: learned position embedding over two stacked images
    "flf2v": dict(_BASE, num_attention_heads=2, attention_head_dim=8, text_dim=16, ffn_dim=32,
                  num_layers=1, image_dim=12, added_kv_proj_dim=16, pos_embed_seq_len=10),
}  # fmt: skip

LATENT_SIZES = [(3, 6, 10), (1, 6, 10), (5, 7, 9)]  # (T, H, W); 7 and 9 are cut by the patch
NUM_IMAGE_TOKENS = 5
TEXT_TOKENS = 7  # T2V text length (any); I2V always uses TEXT_CONTEXT_LENGTH text tokens

_models: dict[str, tuple[DiffusersWanDiT, WanTransformer3DModel]] = {}


def _constructor_config(reference: DiffusersWanDiT) -> dict:
    return {k: v for k, v in reference.config.items() if not k.startswith("_")}


def _model_pair(name: str) -> tuple[DiffusersWanDiT, WanTransformer3DModel]:
    if name not in _models:
        torch.manual_seed(0)
        reference = DiffusersWanDiT(**CONFIGS[name]).eval()
        with torch.no_grad():  # move norm gains, biases and pos_embed off their init values
            for param in reference.parameters():
                param.add_(0.1 * torch.randn_like(param))
        ours = WanTransformer3DModel(**_constructor_config(reference)).eval()
        load_weights_into_model(ours, reference.state_dict().items(), component="transformer")
        _models[name] = (reference, ours)
    return _models[name]


def _inputs(name: str, latent: tuple[int, int, int], batch: int = 2, dtype=torch.float32):
    cfg = CONFIGS[name]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg["in_channels"], *latent, generator=gen, dtype=dtype)
    t = torch.rand(batch, generator=gen) * 1000
    i2v = cfg.get("image_dim") is not None
    text = torch.randn(batch, TEXT_CONTEXT_LENGTH if i2v else TEXT_TOKENS, cfg["text_dim"],
                       generator=gen, dtype=dtype)  # fmt: skip
    image = None
    if i2v:
        # FLF2V stacks the first- and last-frame image tokens on the batch axis.
        image_batch = 2 * batch if cfg.get("pos_embed_seq_len") else batch
        image = torch.randn(image_batch, NUM_IMAGE_TOKENS, cfg["image_dim"], generator=gen,
                            dtype=dtype)  # fmt: skip
    return x, t, text, image


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


# A grid with fewer latent frames than the temporal patch cannot run in either model.
_RUNNABLE = [
    (name, latent)
    for name in CONFIGS
    for latent in LATENT_SIZES
    if latent[0] >= CONFIGS[name].get("patch_size", (1, 2, 2))[0]
]


@pytest.mark.parametrize(
    ("name", "latent"), _RUNNABLE, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in _RUNNABLE]
)
def test_forward_matches_diffusers_fp32(name: str, latent: tuple[int, int, int]) -> None:
    reference, ours = _model_pair(name)
    x, t, text, image = _inputs(name, latent)
    with torch.no_grad():
        expected = reference(x, t, text, encoder_hidden_states_image=image, return_dict=False)[0]
        actual = ours(x, t, text, image)
    diff = _max_diff(expected, actual)
    print(f"{name} {latent}: max abs diff {diff:.3e}")
    assert diff <= TOL, f"{name} {latent}: max abs diff {diff}"


def _to_bf16_keeping_fp32(model: torch.nn.Module) -> torch.nn.Module:
    """Cast to bf16 except ``_keep_in_fp32_modules``, as diffusers' from_pretrained does (the
    kept parameters and buffers, rope's cos/sin included, never pass through bf16)."""
    keep = model._keep_in_fp32_modules
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not any(part in keep for part in name.split(".")):
            tensor.data = tensor.data.to(torch.bfloat16)
    return model


@pytest.mark.parametrize("name", ["heads3_dim14_qknone", "i2v"])
def test_forward_matches_diffusers_bf16(name: str) -> None:
    """bf16 with diffusers' fp32-kept modules: the casts sit where diffusers puts them."""
    reference, ours = _model_pair(name)
    config = _constructor_config(reference)
    reference_bf16 = DiffusersWanDiT(**config).eval()
    reference_bf16.load_state_dict(reference.state_dict())
    _to_bf16_keeping_fp32(reference_bf16)
    ours_bf16 = WanTransformer3DModel(**config).eval()
    ours_bf16.load_state_dict(ours.state_dict())
    _to_bf16_keeping_fp32(ours_bf16)

    x, t, text, image = _inputs(name, (3, 6, 10), dtype=torch.bfloat16)
    with torch.no_grad():
        expected = reference_bf16(x, t, text, encoder_hidden_states_image=image)[0]
        actual = ours_bf16(x, t, text, image)
    assert actual.dtype == torch.bfloat16
    diff = _max_diff(expected, actual)
    print(f"{name} bf16: max abs diff {diff:.3e}")
    # Bitwise equal on CPU here; allow one bf16 ulp at the output's largest magnitude in case a
    # platform's fused GEMM rounds differently from diffusers' separate ones.
    assert diff <= 2**-7 * expected.float().abs().max().item()


def test_config_namespace_and_from_config() -> None:
    reference, ours = _model_pair("i2v")
    assert ours.config.patch_size == (1, 2, 2)
    assert ours.config.in_channels == 9 and ours.config.image_dim == 12
    rebuilt = WanTransformer3DModel.from_config(dict(reference.config))
    assert vars(rebuilt.config) == vars(ours.config)


@pytest.mark.parametrize(
    ("field", "value"),
    [("qk_norm", "layer_norm"), ("attention_head_dim", 7), ("added_kv_proj_dim", 5),
     ("patch_size", (1, 2))],
)  # fmt: skip
def test_unsupported_config_raises(field: str, value) -> None:
    config = dict(CONFIGS["heads2_dim8"], **{field: value})
    with pytest.raises(ValueError, match=field):
        WanTransformer3DModel(**config)


def test_bad_inputs_raise() -> None:
    _, ours = _model_pair("heads2_dim8")
    x, t, text, _ = _inputs("heads2_dim8", (1, 6, 10))
    with pytest.raises(ValueError, match="timestep"):
        ours(x, t[:, None].expand(2, 15), text)  # Wan2.2 TI2V per-token timesteps
    _, i2v = _model_pair("i2v")
    x, t, text, image = _inputs("i2v", (1, 6, 10))
    with pytest.raises(ValueError, match="512 text tokens"):
        i2v(x, t, text[:, :TEXT_TOKENS], image)


def test_loader_rejects_incomplete_checkpoint() -> None:
    reference, _ = _model_pair("heads2_dim8")
    fresh = WanTransformer3DModel(**_constructor_config(reference))
    state = dict(reference.state_dict())
    del state["blocks.1.attn1.to_v.weight"]
    with pytest.raises(ValueError, match="to_qkv"):
        load_weights_into_model(fresh, state.items(), component="transformer")


def test_tensor_parallel_slices_load() -> None:
    """Built as rank r of 2, every sharded weight holds the rank's heads / features."""
    reference, _ = _model_pair("i2v")
    config, state = _constructor_config(reference), reference.state_dict()
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    half = inner // 2
    for rank in range(2):
        with tensor_parallel_coordinates(rank, 2):
            shard = WanTransformer3DModel(**config)
            load_weights_into_model(shard, state.items(), component="transformer")
        rows = slice(rank * half, (rank + 1) * half)
        attn1, attn2 = shard.blocks[1].attn1, shard.blocks[1].attn2
        q, k, v = attn1.to_qkv.weight.chunk(3)
        assert torch.equal(q, state["blocks.1.attn1.to_q.weight"][rows])
        assert torch.equal(k, state["blocks.1.attn1.to_k.weight"][rows])
        assert torch.equal(v, state["blocks.1.attn1.to_v.weight"][rows])
        assert torch.equal(attn1.norm_k.weight, state["blocks.1.attn1.norm_k.weight"][rows])
        assert torch.equal(attn2.add_kv_proj.bias.chunk(2)[1],
                           state["blocks.1.attn2.add_v_proj.bias"][rows])  # fmt: skip
        assert torch.equal(attn2.to_out.weight, state["blocks.1.attn2.to_out.0.weight"][:, rows])
        assert attn1.local_heads == attn2.local_heads == 1
