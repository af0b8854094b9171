"""Full-size random-weight Wan2.1 pipelines in diffusers format, written fast (benchmarks).

    save_random_wan("/tmp/wan-1.3b", size="1.3b")          # Wan2.1-T2V-1.3B shapes
    save_random_wan("/tmp/wan-14b", size="14b")            # Wan2.1-T2V-14B shapes
    save_random_wan("/tmp/wan-i2v", size="14b", image_to_video=True)
    save_random_wan("/tmp/wan-tiny", size="tiny")          # tiny_wan's configs (CPU tests)

The folder is what ``WanPipeline.save_pretrained`` writes (``model_index.json``, one
sub-folder per component with diffusers'/transformers' ``config.json`` and sharded
safetensors), with the released Wan2.1 configs: the DiT of the 1.3B or 14B model, the real
``AutoencoderKLWan`` and the UMT5-XXL text encoder (vocabulary of 256,384 rows). Speed does
not depend on the weights' values, so they are random.

Fast: no module is ever materialised. Each model is built on PyTorch's meta device (shapes
only, no memory, no init), and every tensor is drawn straight into its target dtype on the
GPU when there is one (``torch.empty(...).normal_()``), copied to the host and appended to a
safetensors shard by a background thread while the next one is drawn. The 14B DiT plus the
UMT5 encoder (about 40 GB in bf16) is bound by the disk, not by initialisation.

Values: biases 0, norm scales 1, other vectors N(0, 0.02^2), every other tensor
N(0, 1/fan_in), so activations stay of order one through the layers (no inf/NaN in bf16).

The tokenizer is tiny_wan's (a small Unigram vocabulary trained here, nothing downloaded):
its ids are all far below the model's 256,384 rows, which is all a benchmark needs.
``size="tiny"`` reuses ``tiny_wan``'s configs exactly, so the same code path runs in CPU tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

SIZES = ("tiny", "1.3b", "14b")

#: The DiT of each released Wan2.1 size (diffusers' ``WanTransformer3DModel`` keys).
DIT_SHAPES: dict[str, dict[str, int]] = {
    "1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    "14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
}
DIT_COMMON: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
#: google/umt5-xxl, the Wan2.1 text encoder (transformers' ``UMT5Config`` keys).
UMT5_XXL: dict[str, Any] = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_decoder_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    dropout_rate=0.1,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
    scalable_attention=True,
)
#: The image encoder of Wan2.1-I2V (open_clip ViT-H/14 as transformers' ``CLIPVisionConfig``).
CLIP_VIT_H14: dict[str, Any] = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    patch_size=14,
    image_size=224,
    projection_dim=1024,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
)
#: Wan2.1's flow shift: 3.0 at 480p (the 1.3B model's resolution), 5.0 at 720p.
FLOW_SHIFT = {"tiny": 3.0, "1.3b": 3.0, "14b": 5.0}
#: (frames, height, width) each size is benchmarked at.
VIDEO_SHAPES = {"tiny": (9, 64, 96), "1.3b": (81, 480, 832), "14b": (81, 720, 1280)}

#: Components kept in float32 whatever ``dtype`` says (the model cards load them so).
_FP32_COMPONENTS = ("vae", "image_encoder")
#: Written last: a folder without it is incomplete (``cached_random_wan`` rebuilds it).
MARKER = "random_wan.json"

_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
}
_WEIGHTS_NAMES = {
    "diffusers": "diffusion_pytorch_model",
    "transformers": "model",
}


def _scheduler(flow_shift: float):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=flow_shift,
        num_train_timesteps=1000,
    )


def build_random_wan_components(size: str, image_to_video: bool = False) -> dict[str, Any]:
    """The pipeline's components: models on the meta device (shapes, no memory) for the real
    sizes, tiny_wan's CPU modules for ``"tiny"``; tokenizer, scheduler, image processor real.
    Only the models' configs and parameter shapes are used when writing."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if size == "tiny":
        from fastvideo.testing.tiny_wan import TinyWanConfig, build_tiny_wan_components

        return build_tiny_wan_components(TinyWanConfig(image_to_video=image_to_video))

    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from fastvideo.testing.tiny_wan import build_tokenizer

    tokenizer = build_tokenizer()
    dit_config = {**DIT_COMMON, **DIT_SHAPES[size]}
    components: dict[str, Any] = {"tokenizer": tokenizer}
    with torch.device("meta"):
        components["text_encoder"] = UMT5EncoderModel(UMT5Config(**UMT5_XXL))
        components["vae"] = AutoencoderKLWan()  # diffusers' defaults are the Wan2.1 VAE
        if image_to_video:
            from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

            inner = dit_config["num_attention_heads"] * dit_config["attention_head_dim"]
            dit_config.update(in_channels=36, image_dim=1280, added_kv_proj_dim=inner)
            components["image_encoder"] = CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H14))
            components["image_processor"] = CLIPImageProcessor()  # 224 px, CLIP's mean/std
        components["transformer"] = WanTransformer3DModel(**dit_config)
    components["scheduler"] = _scheduler(FLOW_SHIFT[size])
    return components


def _parse_size(value: int | str) -> int:
    if isinstance(value, int):
        return value
    text = value.strip().upper()
    for suffix, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def _tensors_to_write(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter, each tied parameter once (under its first name, as
    ``save_pretrained`` writes it). Persistent buffers would need real values: none exist in
    the Wan models, and one appearing is an error rather than silently random."""
    params = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    state_keys = set(model.state_dict().keys())
    all_params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    buffers = sorted(state_keys - all_params)
    if buffers:
        raise ValueError(f"{type(model).__name__} has persistent buffers {buffers}: not supported")
    return params


def _random_tensor(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, device: str, gen: torch.Generator
) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=dtype, device=device)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return tensor.zero_()
    if leaf == "gamma" or (len(shape) == 1 and leaf == "weight"):
        return tensor.fill_(1.0)  # norm scales (the Wan VAE's RMS norms call theirs gamma)
    fan_in = max(1, tensor.numel() // shape[0]) if len(shape) > 1 else 2500
    return tensor.normal_(0.0, fan_in**-0.5, generator=gen)


class _ShardWriter:
    """Appends raw bytes to open files on one background thread (FIFO), with at most
    ``max_pending`` writes queued, so drawing and copying the next tensor overlaps the disk.
    ``file.write`` releases the GIL."""

    def __init__(self, max_pending: int = 3) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="random-wan-writer")
        self._pending: deque[Future] = deque()
        self._max_pending = max_pending

    def submit(self, fn, *args) -> None:
        while len(self._pending) >= self._max_pending:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._pool.shutdown(wait=True)


def _write_bytes(handle, tensor: torch.Tensor) -> None:
    handle.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


def write_random_safetensors(
    tensors: list[tuple[str, tuple[int, ...]]],
    folder: Path,
    weights_name: str,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
    max_shard_size: int | str = "5GB",
    writer: _ShardWriter | None = None,
) -> list[Path]:
    """Write random ``tensors`` as ``{weights_name}.safetensors``, or as numbered shards with a
    ``{weights_name}.safetensors.index.json`` when they exceed ``max_shard_size`` (the layout
    diffusers and transformers write and read)."""
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"dtype {dtype} is not one of {list(_SAFETENSORS_DTYPES)}")
    limit = _parse_size(max_shard_size)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    shard_bytes = 0
    for name, shape in tensors:
        nbytes = itemsize * _numel(shape)
        if shards[-1] and shard_bytes + nbytes > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((name, shape))
        shard_bytes += nbytes
    count = len(shards)
    names = (
        [f"{weights_name}.safetensors"]
        if count == 1
        else [f"{weights_name}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    )
    gen = torch.Generator(device=device).manual_seed(seed)
    own_writer = writer is None
    writer = writer or _ShardWriter()
    weight_map: dict[str, str] = {}
    total = 0
    paths = []
    try:
        for shard, file_name in zip(shards, names, strict=True):
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, shape in shard:
                nbytes = itemsize * _numel(shape)
                header[name] = {
                    "dtype": _SAFETENSORS_DTYPES[dtype],
                    "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes],
                }
                offset += nbytes
                weight_map[name] = file_name
            total += offset
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
            path = folder / file_name
            handle = open(path, "wb")  # noqa: SIM115 - closed by the writer thread, in order
            writer.submit(handle.write, len(encoded).to_bytes(8, "little") + encoded)
            for name, shape in shard:
                host = _random_tensor(name, shape, dtype, device, gen).cpu()
                writer.submit(_write_bytes, handle, host)
            writer.submit(handle.close)
            paths.append(path)
        writer.drain()
    finally:
        if own_writer:
            writer.close()
    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{weights_name}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return paths


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def _library(module: Any) -> str:
    return type(module).__module__.split(".")[0]


def _save_model_config(model: nn.Module, folder: Path) -> None:
    if _library(model) == "diffusers":
        model.save_config(str(folder))
        return
    config = model.config
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(folder))


def _same_text_encoder(source: Path, model: nn.Module) -> bool:
    """Does ``source`` (a text_encoder folder written here) hold this encoder's shapes?"""
    try:
        theirs = json.loads((source / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not any(source.glob("*.safetensors")):
        return False
    ours = model.config.to_dict()
    keys = ("model_type", "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
    return all(theirs.get(k) == ours.get(k) for k in keys)


def save_random_wan(
    folder: str | os.PathLike,
    size: str = "1.3b",
    image_to_video: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    device: str | None = None,
    seed: int = 0,
    max_shard_size: int | str = "5GB",
    text_encoder_from: str | os.PathLike | None = None,
) -> Path:
    """Write a random-weight Wan2.1 pipeline (T2V, or I2V with ``image_to_video``) of ``size``
    ("tiny", "1.3b", "14b") to ``folder``; returns it.

    The DiT and the text encoder are stored in ``dtype``; the VAE and the CLIP image encoder
    in float32, as the model cards load them. ``device``: where the values are drawn (default
    CUDA when available). ``text_encoder_from``: an existing ``text_encoder`` folder of the
    same UMT5 shape (another size's), linked instead of written again.
    """
    started = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    components = build_random_wan_components(size, image_to_video)

    from diffusers import WanImageToVideoPipeline, WanPipeline

    pipeline_cls = WanImageToVideoPipeline if image_to_video else WanPipeline
    # model_index.json exactly as diffusers writes it (library and class of each component).
    pipeline_cls(**components).save_config(str(folder))

    written: dict[str, Any] = {}
    writer = _ShardWriter()
    try:
        for index, (name, component) in enumerate(sorted(components.items())):
            target = folder / name
            if not isinstance(component, nn.Module):
                component.save_pretrained(str(target))
                continue
            if name == "text_encoder" and text_encoder_from is not None:
                source = Path(text_encoder_from).resolve()
                if _same_text_encoder(source, component):
                    os.symlink(os.path.relpath(source, folder.resolve()), target)
                    written[name] = {"linked_to": str(source)}
                    continue
            target.mkdir(exist_ok=True)
            _save_model_config(component, target)
            component_dtype = torch.float32 if name in _FP32_COMPONENTS else dtype
            tensors = _tensors_to_write(component)
            write_random_safetensors(
                tensors,
                target,
                _WEIGHTS_NAMES[_library(component)],
                component_dtype,
                device,
                seed=seed + index,
                max_shard_size=max_shard_size,
                writer=writer,
            )
            written[name] = {
                "params": sum(_numel(shape) for _, shape in tensors),
                "dtype": str(component_dtype).removeprefix("torch."),
            }
    finally:
        writer.close()
    info = {
        "size": size,
        "image_to_video": image_to_video,
        "seed": seed,
        "components": written,
        "write_s": round(time.perf_counter() - started, 2),
    }
    (folder / MARKER).write_text(json.dumps(info, indent=2))
    return folder


def cached_random_wan(
    root: str | os.PathLike,
    size: str = "1.3b",
    image_to_video: bool = False,
    **kwargs: Any,
) -> Path:
    """``root/wan2.1-<size>-<t2v|i2v>``, written by :func:`save_random_wan` unless a complete
    one is already there (so several benchmarks of one session share it). A sibling of
    another size with the same UMT5 encoder lends its ``text_encoder`` (a symlink)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"wan2.1-{size}-{'i2v' if image_to_video else 't2v'}"
    folder = root / name
    if (folder / MARKER).is_file():
        return folder
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(folder)
    if size != "tiny" and "text_encoder_from" not in kwargs:
        for sibling in sorted(root.glob("wan2.1-*")):
            encoder = sibling / "text_encoder"
            complete = (sibling / MARKER).is_file() and "-tiny-" not in sibling.name
            if complete and encoder.is_dir() and not encoder.is_symlink():
                kwargs["text_encoder_from"] = encoder
                break
    partial = root / f".{name}.partial-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(partial)
    save_random_wan(partial, size=size, image_to_video=image_to_video, **kwargs)
    os.replace(partial, folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m bench.random_wan", description=__doc__.split("\n")[0]
    )
    parser.add_argument("folder", help="where to write (with --cached: the root folder)")
    parser.add_argument(
        "--size", default="1.3b", help=f"{'/'.join(SIZES)}; comma list with --cached"
    )
    parser.add_argument(
        "--cached",
        action="store_true",
        help="write FOLDER/wan2.1-<size>-<t2v|i2v> unless complete (cached_random_wan); the "
        "1.3b and 14b folders share one text encoder",
    )
    parser.add_argument("--i2v", action="store_true", help="image-to-video pipeline")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-shard-size", default="5GB")
    ns = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[ns.dtype]
    sizes = [s.strip() for s in ns.size.split(",")] if ns.cached else [ns.size]
    for size in sizes:
        if size not in SIZES:
            parser.error(f"--size {size!r}: choose from {SIZES}")
        options = dict(dtype=dtype, device=ns.device, max_shard_size=ns.max_shard_size)
        started = time.perf_counter()
        if ns.cached:
            folder = cached_random_wan(ns.folder, size, ns.i2v, **options)
        else:
            folder = save_random_wan(ns.folder, size=size, image_to_video=ns.i2v, **options)
        print(f"{folder} ({time.perf_counter() - started:.1f}s):")
        print((folder / MARKER).read_text(), flush=True)


if __name__ == "__main__":
    main()
