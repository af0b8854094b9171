"""Write frames to an H.264 mp4 with PyAV (FFmpeg's encoders, no ffmpeg binary needed)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np


def frames_to_uint8(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) float in [0, 1] -> uint8, rounding to nearest."""
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_mp4(frames: np.ndarray, path: str | Path, fps: int, crf: int = 18) -> Path:
    import av

    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape (T, H, W, 3), got {frames.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames.shape[1:3]
    # 4:2:0 chroma (what every player decodes) needs even sizes; odd sizes keep full chroma.
    pix_fmt = "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"
    data = frames_to_uint8(frames) if frames.dtype != np.uint8 else frames
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.time_base = Fraction(1, fps)
        stream.options = {"crf": str(crf)}
        for index, frame in enumerate(data):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            # Explicit timestamps: frame i at i/fps, so players read exactly `fps`.
            video_frame.pts, video_frame.time_base = index, Fraction(1, fps)
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
