"""FastVideo (the upstream project) as a peer: its Wan DiT forward, timed like bench/dit_step.

Our package is also named ``fastvideo``, so FastVideo cannot be imported next to it. This
script runs in its own process with FastVideo's install first on ``PYTHONPATH`` and this
repository NOT on it (``bench/dit_step.py --fastvideo-site DIR`` starts it that way and
merges its JSON into its table):

    PYTHONPATH=/tmp/fv python bench/fastvideo_peer.py --shape 1.3b --json out.json

``DIR`` holds ``pip install --no-deps --target DIR fastvideo==0.2.1`` plus the few of its
dependencies the DiT's import chain needs that the machine lacks (cloudpickle, imageio,
einops, remote-pdb, ...). Heavy optional ones its package ``__init__`` imports but the DiT
forward never calls (torchvision, scipy, flashinfer, fastvideo-kernel, ray) become empty
modules where not installed: using one raises. Only those: transformers probes others
(torchcodec, av, ...) with find_spec and would take an empty module for an installed one.

Rows: FastVideo eager as shipped (its CUDA platform module turns cuDNN attention off
process-wide at import, so SDPA runs FlashAttention-2), and with cuDNN attention turned back
on. Random weights (its own initialisation), bf16, median of ``--repeats`` forwards after
``--warmup``, peak GiB of the forwards.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import statistics
import sys
import time
import types

# Imported by FastVideo's package __init__ chain, never by the DiT forward: the ones not
# installed become empty modules.
OPTIONAL = {"torchvision", "scipy", "fastvideo_kernel", "flashinfer", "ray"}

# Same shapes as bench/dit_step.py (kept here: this script cannot import our package).
SHAPES = {
    "tiny": {"latent": (3, 8, 12), "text": 7, "config": dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=64, num_layers=2)},
    "1.3b": {"latent": (21, 60, 104), "text": 512, "config": dict(
        num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30)},
}  # fmt: skip


class _EmptyModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def missing(attr: str, owner: str = spec.name):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _unusable(f"{owner}.{attr}")

        module.__getattr__ = missing
        return module

    def exec_module(self, module) -> None:
        pass


def _unusable(name: str) -> type:
    class Unusable:
        def __init__(self, *args, **kwargs) -> None:
            raise ImportError(f"{name} is not installed (bench/fastvideo_peer.py stubs it)")

        def __class_getitem__(cls, item):
            return cls

    Unusable.__name__ = name.rsplit(".", 1)[-1]
    return Unusable


def import_fastvideo():
    # transformers and diffusers probe optional packages when imported: before the stubs.
    import diffusers  # noqa: F401
    from transformers import PreTrainedModel  # noqa: F401

    missing = {name for name in OPTIONAL if importlib.util.find_spec(name) is None}
    # peft (LoRA only) is stubbed even when installed: a peft built for transformers 4
    # fails at import under transformers 5 (as on the GPU machine's image).
    sys.meta_path.insert(0, _EmptyModules(missing | {"peft"}))
    import fastvideo

    if os.path.dirname(os.path.dirname(os.path.abspath(__file__))) in fastvideo.__file__:
        raise SystemExit("this repository's fastvideo is on the path: run with FastVideo's only")
    from fastvideo.configs.models.dits import WanVideoConfig
    from fastvideo.forward_context import set_forward_context

    from fastvideo.distributed.parallel_state import (
        maybe_init_distributed_environment_and_model_parallel,
    )
    from fastvideo.models.dits.wanvideo import WanTransformer3DModel
    from fastvideo.pipelines.pipeline_batch_info import ForwardBatch

    return (
        WanVideoConfig,
        WanTransformer3DModel,
        maybe_init_distributed_environment_and_model_parallel,
        set_forward_context,
        ForwardBatch,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.3b")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None)
    ns = parser.parse_args()
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517")):
        os.environ.setdefault(key, value)

    import torch

    config_cls, model_cls, init_parallel, forward_context, batch_cls = import_fastvideo()
    import fastvideo

    init_parallel(tp_size=1, sp_size=1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = SHAPES[ns.shape]
    hf_config = dict(shape["config"])
    config = config_cls()
    config.update_model_arch(hf_config)
    torch.manual_seed(0)
    with torch.device(device):
        model = model_cls(config=config, hf_config=hf_config)
    model = model.to(device, torch.bfloat16).eval().requires_grad_(False)

    gen = torch.Generator(device).manual_seed(0)
    frames, height, width = shape["latent"]
    latents = torch.randn(1, 16, frames, height, width, device=device, generator=gen)
    text = torch.randn(1, shape["text"], 4096, device=device, generator=gen)
    latents, text = latents.bfloat16(), text.bfloat16()
    timestep = torch.tensor([999], device=device)

    def forward():
        with forward_context(
            current_timestep=0, attn_metadata=None, forward_batch=batch_cls(data_type="dummy")
        ):
            return model(hidden_states=latents, encoder_hidden_states=text, timestep=timestep)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def time_forward() -> dict:
        with torch.inference_mode():
            for _ in range(ns.warmup):
                forward()
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(ns.repeats):
                started = time.perf_counter()
                forward()
                sync()
                times.append(time.perf_counter() - started)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        return {"forward_s": statistics.median(times), "peak_gib": peak}

    results = {
        "fastvideo_version": getattr(fastvideo, "__version__", "?"),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": ns.shape,
        "rows": {},
    }
    cudnn_at_import = torch.backends.cuda.cudnn_sdp_enabled()
    results["cudnn_sdp_enabled_after_import"] = cudnn_at_import
    results["rows"]["FastVideo eager"] = time_forward()
    print(json.dumps(results["rows"]), flush=True)
    if device.type == "cuda" and not cudnn_at_import:
        torch.backends.cuda.enable_cudnn_sdp(True)
        results["rows"]["FastVideo eager, cuDNN attention re-enabled"] = time_forward()
    print(json.dumps(results, indent=2))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
