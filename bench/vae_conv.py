"""The Wan VAE decoder's dominant convolution alone, in the layouts cuDNN could run it in.

A causal 3x3x3 convolution at the decoder's full resolution (96 -> 96 channels, a chunk of 4
frames after the 2 cached ones, 480x832, zero spatial padding already applied), fp32 with
cuDNN's TF32 (PyTorch's default), timed as: ``conv3d`` on NCDHW (what diffusers runs),
``conv3d`` on channels-last NDHWC, and the same sum written as one ``conv2d`` per output frame
batch over the three input frames stacked along channels (NHWC). Median ms of 10 calls, max
difference from NCDHW ``conv3d``, and the achieved TFLOPS.

    python -m bench.vae_conv [--channels 96] [--size 480,832] [--frames 4]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench.sta_kernel import median_ms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--channels", type=int, default=96)
    parser.add_argument("--size", default="480,832")
    parser.add_argument("--frames", type=int, default=4)
    ns = parser.parse_args()
    height, width = (int(v) for v in ns.size.split(","))
    c, t = ns.channels, ns.frames
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, c, t + 2, height + 2, width + 2, device="cuda", generator=gen)
    weight = torch.randn(c, c, 3, 3, 3, device="cuda", generator=gen) * (27 * c) ** -0.5
    bias = torch.randn(c, device="cuda", generator=gen)
    flops = 2 * 27 * c * c * t * height * width
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": {}}

    ref = F.conv3d(x, weight, bias)
    x_cl = x.contiguous(memory_format=torch.channels_last_3d)
    w_cl = weight.contiguous(memory_format=torch.channels_last_3d)
    # Frames t, t+1, t+2 stacked along channels: (t, 3c, H, W) and a (c, 3c, 3, 3) kernel.
    stacked = torch.cat([x[0, :, i : i + t] for i in range(3)], dim=0).transpose(0, 1)
    stacked = stacked.contiguous(memory_format=torch.channels_last)
    w2d = weight.permute(0, 2, 1, 3, 4).reshape(c, 3 * c, 3, 3)
    w2d = w2d.contiguous(memory_format=torch.channels_last)
    cases = {
        "conv3d NCDHW": lambda: F.conv3d(x, weight, bias),
        "conv3d NDHWC (channels-last)": lambda: F.conv3d(x_cl, w_cl, bias),
        "conv2d over 3 stacked frames, NHWC": lambda: F.conv2d(stacked, w2d, bias),
    }
    for label, fn in cases.items():
        out = fn()
        if out.dim() == 4:  # (t, c, H, W) -> (1, c, t, H, W)
            out = out.transpose(0, 1)[None]
        ms = median_ms(fn)
        results["rows"][label] = {
            "ms": ms,
            "tflops": flops / ms / 1e9,
            "max_abs_diff": (out - ref).abs().max().item(),
        }
        print(json.dumps({label: results["rows"][label]}), flush=True)
    shape = f"{c}->{c} 3x3x3, {t} frames {height}x{width}"
    print(f"\n{results['gpu']}, torch {results['torch']}: {shape}")
    print("| layout | ms | TFLOPS | max abs diff |\n| --- | --- | --- | --- |")
    for label, row in results["rows"].items():
        print(f"| {label} | {row['ms']:.2f} | {row['tflops']:.0f} | {row['max_abs_diff']:.1e} |")


if __name__ == "__main__":
    main()
