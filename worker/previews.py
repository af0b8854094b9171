"""The two previews of a rendered video, made beside its mp4: the first frame as WebP (the
``thumbnail`` variant of ``GET /v1/videos/{id}/content``) and a JPEG grid of evenly spaced
frames (``spritesheet``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fvb_core.storage import spritesheet_key, thumbnail_key

#: Previews. The thumbnail is the first frame, at most this many pixels on its long side.
THUMBNAIL_MAX_SIDE = 640
THUMBNAIL_QUALITY = 85
#: The spritesheet: up to SPRITE_FRAMES evenly spaced frames (first and last included), in
#: rows of at most SPRITE_COLUMNS, each tile at most SPRITE_TILE_MAX pixels on its long side.
SPRITE_FRAMES = 10
SPRITE_COLUMNS = 5
SPRITE_TILE_MAX = 160
SPRITE_QUALITY = 80


def spritesheet_frames(num_frames: int, count: int = SPRITE_FRAMES) -> list[int]:
    """``count`` (or fewer, for a short video) evenly spaced frame indices, first and last
    included."""
    n = max(1, min(count, num_frames))
    if n == 1:
        return [0]
    return [i * (num_frames - 1) // (n - 1) for i in range(n)]


def _fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass
class Preview:
    """A preview image on local disk, the key it goes to, and what the sidecar says of it."""

    key: str
    path: Path
    content_type: str
    info: dict[str, Any]


def make_previews(frames: np.ndarray, folder: Path, job_id: str, attempt: int) -> list[Preview]:
    """The thumbnail (first frame, WebP) and the spritesheet (JPEG grid) of (T, H, W, 3) uint8
    frames, written under ``folder``."""
    from PIL import Image

    num_frames, height, width = (int(n) for n in frames.shape[:3])
    thumb_size = _fit(width, height, THUMBNAIL_MAX_SIDE)
    thumbnail = Image.fromarray(frames[0])
    if thumbnail.size != thumb_size:
        thumbnail = thumbnail.resize(thumb_size, Image.Resampling.LANCZOS)
    thumb_path = folder / "thumbnail.webp"
    thumbnail.save(thumb_path, format="WEBP", quality=THUMBNAIL_QUALITY)

    indices = spritesheet_frames(num_frames)
    rows = math.ceil(len(indices) / SPRITE_COLUMNS)
    columns = math.ceil(len(indices) / rows)
    tile_w, tile_h = _fit(width, height, SPRITE_TILE_MAX)
    sheet = Image.new("RGB", (columns * tile_w, rows * tile_h))
    for n, index in enumerate(indices):
        tile = Image.fromarray(frames[index])
        if tile.size != (tile_w, tile_h):
            tile = tile.resize((tile_w, tile_h), Image.Resampling.LANCZOS)
        sheet.paste(tile, ((n % columns) * tile_w, (n // columns) * tile_h))
    sheet_path = folder / "spritesheet.jpg"
    sheet.save(sheet_path, format="JPEG", quality=SPRITE_QUALITY)
    return [
        Preview(
            key=thumbnail_key(job_id, attempt),
            path=thumb_path,
            content_type="image/webp",
            info={"width": thumb_size[0], "height": thumb_size[1], "frame": 0},
        ),
        Preview(
            key=spritesheet_key(job_id, attempt),
            path=sheet_path,
            content_type="image/jpeg",
            info={
                "width": columns * tile_w,
                "height": rows * tile_h,
                "columns": columns,
                "rows": rows,
                "tile_width": tile_w,
                "tile_height": tile_h,
                "frames": indices,
            },
        ),
    ]
