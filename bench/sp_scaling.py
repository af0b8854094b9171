"""DiT time per denoising step on 1..N GPUs: sequence parallel (and CFG-parallel).

Each configuration runs in fresh processes (one per GPU, NCCL), builds the same random-weight
bf16 DiT on every rank, and times a full classifier-free-guidance step: the conditional and
unconditional forwards (both on every rank with SP; one each per CFG group with CFG-parallel,
combined by one all-gather). Median of ``--repeats`` after a warm-up.

    python bench/sp_scaling.py --shape 14b --layouts 1,2,4 [--cfg] [--json out.json]

A layout "4" is SP=4; with ``--cfg`` a layout "4" also runs as SP=2 x CFG=2.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from bench.dit_step import COMMON, SHAPES


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, world: int, port: int, shape: str, cfg: int, repeats: int, out: str):
    import torch.distributed as dist

    from fastvideo.distributed import parallel_state as ps
    from fastvideo.distributed.communication_op import cfg_model_parallel_all_gather
    from fastvideo.models.dits.wanvideo import WanTransformer3DModel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    ps.init_distributed_environment(world_size=world, rank=rank, backend="nccl")
    ps.initialize_model_parallel(sequence_parallel_size=world // cfg, cfg_parallel_size=cfg)
    torch.manual_seed(0)  # identical weights on every rank
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = WanTransformer3DModel(**COMMON, **SHAPES[shape]["config"]).eval()
    torch.set_default_dtype(saved)
    model.requires_grad_(False)
    frames, height, width = SHAPES[shape]["latent"]
    gen = torch.Generator("cuda").manual_seed(1)
    latents = torch.randn(1, 16, frames, height, width, device="cuda", generator=gen).bfloat16()
    texts = [torch.randn(1, 512, 4096, device="cuda", generator=gen).bfloat16() for _ in range(2)]
    t = torch.tensor([999.0], device="cuda")

    def step():
        with torch.inference_mode():
            if cfg == 2:
                mine = model(latents, t, texts[ps.get_cfg_rank()])
                both = cfg_model_parallel_all_gather(mine.unsqueeze(0), dim=0)
                return both[1] + 5.0 * (both[0] - both[1])
            cond, uncond = model(latents, t, texts[0]), model(latents, t, texts[1])
            return uncond + 5.0 * (cond - uncond)

    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        dist.barrier()
        started = time.perf_counter()
        step()
        torch.cuda.synchronize()
        dist.barrier()
        times.append(time.perf_counter() - started)
    if rank == 0:
        result = {
            "median_s": statistics.median(times),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        }
        Path(out).write_text(json.dumps(result))
    ps.destroy_model_parallel()


def run(shape: str, world: int, cfg: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.start_processes(
            _rank,
            args=(world, _free_port(), shape, cfg, repeats, out),
            nprocs=world,
            start_method="spawn",
        )
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.3b")
    parser.add_argument("--layouts", default="1,2")
    parser.add_argument("--cfg", action="store_true", help="also run SP x CFG=2 layouts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    ns = parser.parse_args()
    rows = []
    for world in (int(n) for n in ns.layouts.split(",")):
        cfgs = [1] + ([2] if ns.cfg and world % 2 == 0 else [])
        for cfg in cfgs:
            result = run(ns.shape, world, cfg, ns.repeats)
            rows.append({"gpus": world, "sp": world // cfg, "cfg": cfg, **result})
            print(json.dumps(rows[-1]), flush=True)
    base = next(r["median_s"] for r in rows if r["gpus"] == 1)
    print(
        f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, Wan2.1-{ns.shape} DiT, "
        "bf16, one CFG step (2 forwards)"
    )
    print("| GPUs | SP | CFG | s / step | speed-up | efficiency | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        speedup = base / r["median_s"]
        print(
            f"| {r['gpus']} | {r['sp']} | {r['cfg']} | {r['median_s']:.3f} | {speedup:.2f}x | "
            f"{speedup / r['gpus']:.0%} | {r['peak_gib']:.1f} |"
        )
    if ns.json:
        Path(ns.json).write_text(json.dumps({"shape": ns.shape, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
