"""``make demo``: the local stack, sample jobs through the HTTP API, videos out.

Jobs go in with the official OpenAI SDK, exactly as a user's client would send them. The
end-to-end test runs this same function, so the demo cannot silently rot.
"""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fvb_tools.localstack.stack import LocalStack

SAMPLES = [
    ("tiny-wan-t2v", "a red panda eating bamboo in the snow", False),
    ("tiny-wan-t2v", "waves crash on a rocky shore at sunset", False),
    ("tiny-wan-i2v", "the picture comes alive, slow camera pan", True),
]


@dataclass
class DemoVideo:
    id: str
    model: str
    prompt: str
    status: str
    storage_uri: str | None
    sha256: str | None
    local_path: Path | None
    seconds_to_complete: float


def _sample_image() -> bytes:
    ramp = np.linspace(0, 255, 128, dtype=np.uint8)
    red, green = np.meshgrid(ramp, ramp[::-1])
    image = Image.fromarray(np.stack([red, green, np.full_like(red, 90)], -1))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def run_demo(data_dir: Path, output_dir: Path, device: str | None = None) -> list[DemoVideo]:
    from openai import OpenAI

    # The SDK marks its videos methods deprecated (for OpenAI's own service, not this API).
    warnings.filterwarnings("ignore", message="The Sora API", category=DeprecationWarning)

    output_dir.mkdir(parents=True, exist_ok=True)
    videos = []
    with LocalStack(data_dir=data_dir, device=device) as info:
        print(f"local stack up: API {info.api_url}, dashboard {info.dashboard_url}", flush=True)
        client = OpenAI(base_url=info.api_url, api_key=info.dev_key, max_retries=0)
        submitted = []
        for index, (model, prompt, with_image) in enumerate(SAMPLES):
            extra = {"num_inference_steps": 8, "seed": index, "fps": 8}
            reference = ("reference.png", _sample_image(), "image/png") if with_image else None
            video = client.videos.create(
                model=model,
                prompt=prompt,
                size="128x128",
                seconds="2",
                extra_body=extra,
                **({"input_reference": reference} if reference else {}),
            )
            print(f"submitted {video.id} ({model}): {prompt!r}", flush=True)
            submitted.append((video, time.monotonic()))
        for video, started in submitted:
            done = client.videos.poll(video.id, poll_interval_ms=200)
            elapsed = time.monotonic() - started
            output = getattr(done, "output", None) or {}
            local = None
            if done.status == "completed":
                local = output_dir / f"{done.id}.mp4"
                client.videos.download_content(done.id).write_to_file(local)
            videos.append(
                DemoVideo(
                    id=done.id,
                    model=done.model,
                    prompt=done.prompt or "",
                    status=done.status,
                    storage_uri=output.get("uri"),
                    sha256=output.get("sha256"),
                    local_path=local,
                    seconds_to_complete=elapsed,
                )
            )
    return videos
