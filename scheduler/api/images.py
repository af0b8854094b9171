"""The reference image of an image-to-video request: checked, decoded, re-encoded as PNG.

Whatever the client sent (JPEG, WebP, PNG with alpha...), the worker reads one format: an
RGB PNG at ``inputs/<job_id>/image.png``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from scheduler.api.errors import ApiError

MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGE_SIDE = 4096
PARAM = "input_reference"

_DATA_URL = re.compile(r"^data:image/[\w.+-]+(;[\w=.+-]+)*;base64,", re.IGNORECASE)


@dataclass(frozen=True)
class ReferenceImage:
    png: bytes
    width: int
    height: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.png).hexdigest()


def _too_large() -> ApiError:
    return ApiError.invalid(
        PARAM, f"input_reference is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MiB"
    )


def bytes_from_data_url(url: str) -> bytes:
    match = _DATA_URL.match(url)
    if match is None:
        raise ApiError.invalid(
            PARAM,
            "input_reference must be an image file or a 'data:image/...;base64,' URL "
            "(remote URLs are not fetched)",
        )
    payload = url[match.end() :]
    # base64 is 4/3 of the data: refuse before decoding what would be too large anyway.
    if len(payload) * 3 // 4 > MAX_IMAGE_BYTES + 3:
        raise _too_large()
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError.invalid(
            PARAM, f"input_reference data URL is not valid base64: {err}"
        ) from err


def decode_image(data: bytes) -> ReferenceImage:
    if len(data) > MAX_IMAGE_BYTES:
        raise _too_large()
    if not data:
        raise ApiError.invalid(PARAM, "input_reference is empty")
    try:
        with Image.open(io.BytesIO(data)) as image:
            # The header gives the size: refuse huge images before decoding their pixels.
            width, height = image.size
            if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
                raise ApiError.invalid(
                    PARAM,
                    f"input_reference is {width}x{height}; at most {MAX_IMAGE_SIDE} pixels "
                    "per side",
                )
            rgb = image.convert("RGB")
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise ApiError.invalid(PARAM, f"input_reference is not a decodable image: {err}") from err
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return ReferenceImage(png=out.getvalue(), width=width, height=height)
