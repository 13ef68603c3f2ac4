"""Aspect-ratio buckets: each image trains in a shape close to its own, of about resolution² pixels.

A bucket is a (width, height) in steps of `alignment` px. `resolution_type=pixel` keeps the
short side at the resolution; `pixel_area` keeps the area near resolution². Without `crop` the
whole image is resized into its bucket (at most the rounding is lost to a slight stretch);
with `crop` it is scaled to cover the bucket and cut per `crop_style`, or to a square with
`crop_aspect=square`.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

MAX_ASPECT = 4.0  # wider or taller images are cropped to 4:1 / 1:4


def alignment_for(resolution: int, configured: int | None) -> int:
    """64 px steps as SimpleTuner; 16 px below 512 px so small test runs still bucket."""
    if configured:
        return configured
    return 64 if resolution >= 512 else 16


def _round_to(value: float, step: int) -> int:
    return max(step, int(round(value / step)) * step)


def clamp_aspect(aspect: float, backend) -> float:
    low = backend.minimum_aspect_ratio or 1 / MAX_ASPECT
    high = backend.maximum_aspect_ratio or MAX_ASPECT
    return min(max(aspect, low), high)


def bucket_for(width: int, height: int, backend, resolution: int, alignment: int) -> tuple[int, int]:
    """The (width, height) an image of this size trains at."""
    if backend.crop and backend.crop_aspect == "square":
        return resolution, resolution
    aspect = clamp_aspect(width / height, backend)
    if backend.resolution_type == "pixel":
        if aspect >= 1:
            return _round_to(resolution * aspect, alignment), resolution
        return resolution, _round_to(resolution / aspect, alignment)
    bucket_width = _round_to(math.sqrt(resolution * resolution * aspect), alignment)
    return bucket_width, _round_to(bucket_width / aspect, alignment)


def size_measure(width: int, height: int, resolution_type: str) -> float:
    """What minimum/maximum_image_size compare against: the short side, or √area for pixel_area."""
    return float(min(width, height)) if resolution_type == "pixel" else math.sqrt(width * height)


def open_rgb(path: Path):
    """The image upright (EXIF), alpha composited on white, in RGB; raises on broken files."""
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        image.load()
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) after EXIF rotation, from the header only; None if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except Exception:  # Pillow raises many types for broken files
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _crop_box(width: int, height: int, target: tuple[int, int], style: str, key: str) -> tuple[int, int, int, int]:
    target_width, target_height = target
    spare_x, spare_y = width - target_width, height - target_height
    if style == "random":  # fixed per image (from its content key) so the cached latent stays valid
        digest = hashlib.sha256(key.encode()).digest()
        left = int.from_bytes(digest[:4], "big") % (spare_x + 1)
        top = int.from_bytes(digest[4:8], "big") % (spare_y + 1)
    elif style == "corner":
        left, top = spare_x, spare_y
    else:
        left, top = spare_x // 2, spare_y // 2
    return left, top, left + target_width, top + target_height


def load_pixels(path: Path, bucket: tuple[int, int], backend, key: str = "",
                downsample_to: float | None = None) -> tuple[torch.Tensor | None, str]:
    """([3, H, W] in [-1, 1] or None, status) with status ok / upscaled / unreadable."""
    import numpy as np
    from PIL import Image

    try:
        image = open_rgb(path)
    except Exception:  # Pillow raises many types for broken files
        return None, "unreadable"
    if downsample_to:  # maximum_image_size: bring huge images down first, aspect kept
        scale = downsample_to / size_measure(image.width, image.height, backend.resolution_type)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
    width, height = bucket
    if backend.crop:
        scale = max(width / image.width, height / image.height)
        resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    else:
        scale = max(width / image.width, height / image.height)
        resized = (width, height)
    status = "upscaled" if scale > 1 else "ok"
    image = image.resize(resized, Image.Resampling.BICUBIC if status == "upscaled" else Image.Resampling.LANCZOS)
    if resized != (width, height):
        image = image.crop(_crop_box(resized[0], resized[1], bucket, backend.crop_style, key))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), status
