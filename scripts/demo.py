"""Render sample videos end to end with the engine, from tiny models built on the spot.

The models have RANDOM weights (nothing is downloaded), so the videos are noise-like
patterns: the demo shows the path, not the art. Point ``fastvideo generate --model-path`` at
a real Wan2.1 diffusers folder for real videos.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"


def _model(name: str, image_to_video: bool) -> Path:
    from fastvideo.testing.tiny_wan import TinyWanConfig, save_tiny_wan

    folder = DEMO / "models" / name
    if not (folder / "model_index.json").is_file():
        print(f"building tiny random-weight model {folder} ...")
        save_tiny_wan(folder, TinyWanConfig(image_to_video=image_to_video), seed=0)
    return folder


def main() -> int:
    from fastvideo import VideoGenerator

    outputs = DEMO / "outputs"
    jobs = [
        ("tiny-wan-t2v", False, "a red panda eating bamboo in the snow", None),
        ("tiny-wan-i2v", True, "waves crash on a rocky shore", "gradient"),
    ]
    written = []
    for name, i2v, prompt, image_kind in jobs:
        generator = VideoGenerator.from_pretrained(_model(name, i2v), device="cpu")
        image = None
        if image_kind:
            ramp = np.linspace(0, 255, 128, dtype=np.uint8)
            red, green = np.meshgrid(ramp, ramp[::-1])
            image = Image.fromarray(np.stack([red, green, np.full_like(red, 90)], -1))
        started = time.perf_counter()
        result = generator.generate_video(
            prompt,
            image=image,
            height=128,
            width=128,
            num_frames=17,
            num_inference_steps=8,
            guidance_scale=5.0,
            seed=42,
            fps=8,
            output_path=outputs / f"{name}.mp4",
        )
        print(
            f"{name}: {result.num_frames} frames {result.width}x{result.height} @ {result.fps} fps "
            f"in {time.perf_counter() - started:.1f}s -> {result.video_path}"
        )
        written.append(result.video_path)
    print("\nThe models have random weights: the videos show the pipeline works, not a picture.")
    print("Videos written:")
    for path in written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
