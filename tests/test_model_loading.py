"""Loading diffusers-format model folders: sharded and half-precision checkpoints load, and
every kind of broken folder fails with one ``ValueError`` that names what is wrong."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fastvideo import VideoGenerator
from fastvideo.models.loader.weight_utils import WeightLoadingError
from fastvideo.testing.tiny_wan import TinyWanConfig, save_tiny_wan

PROMPT = "a red panda eating bamboo in the snow"
REQUEST = dict(height=32, width=48, num_frames=5, num_inference_steps=2, guidance_scale=3.0)
DIT_FILE = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def tiny_t2v_sharded(tmp_path_factory) -> str:
    """The same weights as the ``tiny_t2v`` fixture (same config, seed 0), saved in 20KB shards."""
    folder = tmp_path_factory.mktemp("models") / "tiny-t2v-sharded"
    return str(save_tiny_wan(folder, TinyWanConfig(), seed=0, max_shard_size="20KB"))


def _copy(folder: str, tmp_path: Path) -> Path:
    """A private copy of a session model folder, safe to break."""
    return Path(shutil.copytree(folder, tmp_path / "model"))


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _edit_weights(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _load(path) -> VideoGenerator:
    return VideoGenerator.from_pretrained(path, device="cpu")


# --- checkpoints that must load ------------------------------------------------------------


def test_sharded_checkpoint_gives_the_same_frames_as_the_single_file_save(
    tiny_t2v, tiny_t2v_sharded
):
    sharded = Path(tiny_t2v_sharded)
    for component in ("transformer", "vae", "text_encoder"):
        index_files = list((sharded / component).glob("*.safetensors.index.json"))
        assert len(index_files) == 1, component
        assert len(list((sharded / component).glob("*-of-*.safetensors"))) > 1, component
    single = _load(tiny_t2v).generate_video(PROMPT, seed=5, **REQUEST).frames
    shards = _load(sharded).generate_video(PROMPT, seed=5, **REQUEST).frames
    assert single.shape == (5, 32, 48, 3)
    assert single.std() > 1e-3  # a real video, not a constant that matches trivially
    np.testing.assert_array_equal(shards, single)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_load_into_fp32_model_as_upcast_values(tiny_t2v, tmp_path, dtype):
    folder = _copy(tiny_t2v, tmp_path)

    def cast(tensors):
        for key in tensors:
            tensors[key] = tensors[key].to(dtype)

    _edit_weights(folder / DIT_FILE, cast)
    half = _load(folder).pipeline.get_module("transformer")
    full = _load(tiny_t2v).pipeline.get_module("transformer")

    full_params = dict(full.named_parameters())
    half_params = dict(half.named_parameters())
    assert half_params.keys() == full_params.keys()
    changed = 0
    for name, param in half_params.items():
        assert param.dtype == torch.float32, name
        expected = full_params[name].detach().to(dtype).float()
        torch.testing.assert_close(param, expected, rtol=0, atol=0, msg=name)
        changed += not torch.equal(param, full_params[name])
    assert changed > 0  # the half-precision file really was read, not the fp32 one


def test_half_precision_model_still_generates(tiny_t2v, tmp_path):
    folder = _copy(tiny_t2v, tmp_path)
    _edit_weights(
        folder / DIT_FILE, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()})
    )
    frames = _load(folder).generate_video(PROMPT, seed=5, **REQUEST).frames
    reference = _load(tiny_t2v).generate_video(PROMPT, seed=5, **REQUEST).frames
    assert frames.shape == reference.shape
    assert np.isfinite(frames).all()
    # bf16-rounded weights: close to, but not bit-equal with, the fp32 checkpoint.
    assert 0 < np.abs(frames - reference).max() < 0.02


# --- broken folders: one ValueError naming the component and what is wrong -----------------


def test_missing_component_folder_names_the_component(tiny_t2v, tmp_path):
    folder = _copy(tiny_t2v, tmp_path)
    shutil.rmtree(folder / "vae")
    with pytest.raises(ValueError, match=r"component 'vae' .*has no 'vae' folder"):
        _load(folder)


@pytest.mark.parametrize(
    ("fixture", "component", "pipeline"),
    [
        ("tiny_t2v", "vae", "WanPipeline"),
        ("tiny_t2v", "text_encoder", "WanPipeline"),
        ("tiny_i2v", "image_encoder", "WanImageToVideoPipeline"),
    ],
)
def test_component_missing_from_model_index_is_named(
    request, tmp_path, fixture, component, pipeline
):
    folder = _copy(request.getfixturevalue(fixture), tmp_path)
    _edit_json(folder / "model_index.json", lambda index: index.pop(component))
    with pytest.raises(ValueError, match=rf"{pipeline} needs components \['{component}'\]"):
        _load(folder)


def test_unknown_class_name_in_model_index_is_named(tiny_t2v, tmp_path):
    folder = _copy(tiny_t2v, tmp_path)
    _edit_json(
        folder / "model_index.json", lambda index: index.update(vae=["diffusers", "MysteryVAE"])
    )
    with pytest.raises(ValueError, match=r"component 'vae': _class_name 'MysteryVAE'") as info:
        _load(folder)
    assert "AutoencoderKLWan" in str(info.value)  # and says what is supported


@pytest.mark.parametrize(
    ("weights_file", "component", "key"),
    [
        (DIT_FILE, "transformer", "proj_out.weight"),
        # A fused parameter (to_q/to_k/to_v -> to_qkv) that lacks one of its shards.
        (DIT_FILE, "transformer", "blocks.1.attn1.to_k.weight"),
        ("vae/diffusion_pytorch_model.safetensors", "vae", "decoder.conv_in.bias"),
        ("text_encoder/model.safetensors", "text_encoder", "encoder.final_layer_norm.weight"),
    ],
)
def test_missing_weight_key_is_named(tiny_t2v, tmp_path, weights_file, component, key):
    folder = _copy(tiny_t2v, tmp_path)
    _edit_weights(folder / weights_file, lambda tensors: tensors.pop(key))
    # The fused to_qkv parameter reports its missing shard: blocks.1.attn1.to_qkv.weight[k].
    model_key = key.replace("attn1.to_k.weight", "attn1.to_qkv.weight[k]")
    with pytest.raises(WeightLoadingError, match=rf"component '{component}'.*missing") as info:
        _load(folder)
    assert model_key in str(info.value)


@pytest.mark.parametrize(
    ("weights_file", "component"),
    [(DIT_FILE, "transformer"), ("vae/diffusion_pytorch_model.safetensors", "vae")],
)
def test_unexpected_weight_key_is_named(tiny_t2v, tmp_path, weights_file, component):
    folder = _copy(tiny_t2v, tmp_path)
    _edit_weights(folder / weights_file, lambda t: t.update({"extra.head.weight": torch.ones(3)}))
    with pytest.raises(
        WeightLoadingError, match=rf"component '{component}': unexpected keys.*'extra.head.weight'"
    ):
        _load(folder)


@pytest.mark.parametrize(
    ("weights_file", "component", "key", "shape"),
    [
        (DIT_FILE, "transformer", "proj_out.weight", (5, 5)),
        # Larger than the layer along the sliced dim: must not be silently truncated.
        (DIT_FILE, "transformer", "blocks.0.attn1.to_q.weight", (48, 24)),
        (DIT_FILE, "transformer", "blocks.0.attn1.to_v.bias", (30,)),
        # Smaller along the sliced dim: must not fail with an indexing RuntimeError.
        (DIT_FILE, "transformer", "blocks.0.attn2.to_k.weight", (12, 24)),
        (DIT_FILE, "transformer", "blocks.1.ffn.net.2.weight", (24, 40)),
        ("vae/diffusion_pytorch_model.safetensors", "vae", "decoder.conv_in.bias", (7,)),
    ],
)
def test_shape_mismatch_names_component_key_and_shape(
    tiny_t2v, tmp_path, weights_file, component, key, shape
):
    folder = _copy(tiny_t2v, tmp_path)
    _edit_weights(folder / weights_file, lambda tensors: tensors.update({key: torch.ones(shape)}))
    shape_text = re.escape(str(tuple(shape)))
    with pytest.raises(WeightLoadingError, match=rf"component '{component}'.*{shape_text}") as info:
        _load(folder)
    message = str(info.value)
    # The checkpoint key or the parameter it loads into is named.
    param = key.replace("attn1.to_q.", "attn1.to_qkv.").replace("attn1.to_v.", "attn1.to_qkv.")
    param = param.replace("attn2.to_k.", "attn2.to_kv.").replace("ffn.net.2.", "ffn.fc_out.")
    assert key in message or param in message


@pytest.mark.parametrize(
    ("config_file", "component", "class_name"),
    [
        ("transformer/config.json", "transformer", "WanTransformer3DModel"),
        ("vae/config.json", "vae", "AutoencoderKLWan"),
    ],
)
def test_config_key_the_port_does_not_know_is_named(
    tiny_t2v, tmp_path, config_file, component, class_name
):
    folder = _copy(tiny_t2v, tmp_path)
    _edit_json(folder / config_file, lambda config: config.update(sliding_window_size=64))
    with pytest.raises(ValueError, match=rf"component '{component}'.*{class_name}") as info:
        _load(folder)
    assert "sliding_window_size" in str(info.value)


def test_folder_without_model_index_is_rejected(tiny_t2v, tmp_path):
    folder = _copy(tiny_t2v, tmp_path)
    (folder / "model_index.json").unlink()
    with pytest.raises(ValueError, match=r"has no model_index\.json"):
        _load(folder)


def test_model_path_that_does_not_exist_is_rejected(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ValueError, match=r"is not an existing folder"):
        _load(missing)


def test_hf_repo_id_not_in_cache_is_rejected_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo_id = "fastvideo-tests/definitely-not-cached-model"
    with pytest.raises(ValueError, match=rf"'{repo_id}'.*not in the Hugging Face cache"):
        _load(repo_id)


def test_sharded_index_naming_a_missing_shard_is_rejected(tiny_t2v_sharded, tmp_path):
    folder = _copy(tiny_t2v_sharded, tmp_path)
    shard = sorted((folder / "transformer").glob("*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(
        WeightLoadingError, match=rf"component 'transformer'.*missing.*{re.escape(shard.name)}"
    ):
        _load(folder)


def test_folder_with_only_bin_weights_is_rejected(tiny_t2v, tmp_path):
    folder = _copy(tiny_t2v, tmp_path)
    weights = folder / DIT_FILE
    torch.save(load_file(weights), folder / "transformer" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(
        WeightLoadingError,
        match=r"component 'transformer': no \.safetensors weights.*diffusion_pytorch_model\.bin",
    ):
        _load(folder)


# --- bad arguments to from_pretrained -------------------------------------------------------


def test_unknown_pipeline_class_lists_the_known_pipelines(tiny_t2v):
    with pytest.raises(ValueError, match=r"'NoSuchPipeline' is not registered") as info:
        VideoGenerator.from_pretrained(tiny_t2v, device="cpu", pipeline_class_name="NoSuchPipeline")
    message = str(info.value)
    assert "WanPipeline" in message
    assert "WanImageToVideoPipeline" in message


def test_unknown_engine_keyword_names_the_field(tiny_t2v):
    with pytest.raises(ValueError, match=r"unknown FastVideoArgs field.*'dit_precison'") as info:
        VideoGenerator.from_pretrained(tiny_t2v, device="cpu", dit_precison="bf16")
    assert "dit_precision" in str(info.value)  # the known fields include the intended one
