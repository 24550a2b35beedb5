"""From model output to pixels: [-1, 1] floats to uint8, grids, and PNG, JPEG or WebP bytes.

No torch import: the service's upload workers encode PNGs with this module without loading
torch; `to_uint8` works on a tensor through its own methods.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from undiffuse.image_formats import DEFAULT_QUALITY, IMAGE_FORMATS, OutputFormat

if TYPE_CHECKING:
    from torch import Tensor


def to_uint8(x: Tensor) -> np.ndarray:
    """[N, C, H, W] float in [-1, 1] -> [N, H, W, C] uint8 (values outside are clipped)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(x: Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile [N, C, H, W] in [-1, 1] into one [rows*(H+pad)+pad, cols*(W+pad)+pad, C] uint8 image,
    nrow images per row (default: a square)."""
    n, c, h, w = x.shape
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    images = np.zeros((rows * cols, h, w, c), dtype=np.uint8)
    images[:n] = to_uint8(x)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    view = images.reshape(rows, cols, h, w, c)
    for r in range(rows):  # one row of tiles at a time: rows is small, pixels stay vectorised
        for col in range(cols):
            y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
            grid[y0 : y0 + h, x0 : x0 + w] = view[r, col]
    return grid


def png_bytes(image: np.ndarray, compress_level: int = 6) -> bytes:
    """[H, W, C] uint8 with C in (1, 3) -> PNG file bytes. compress_level 0..9 (zlib): the
    service uses 1, faster to encode at the cost of somewhat larger files."""
    from PIL import Image

    arr = image[..., 0] if image.shape[-1] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_image(image: np.ndarray, output_format: OutputFormat = "png", quality: int | None = None) -> bytes:
    """[H, W, C] uint8 with C in (1, 3) -> file bytes in output_format. PNG is lossless (zlib
    level 1: fast, somewhat larger files); JPEG and WebP take quality 1..100 (DEFAULT_QUALITY
    when None). Grayscale stays one channel in PNG and JPEG; WebP has no grayscale
    mode, so decoders read a one-channel image back as RGB with three equal channels."""
    from PIL import Image

    fmt = IMAGE_FORMATS[output_format]
    if not fmt.lossy:
        return png_bytes(image, compress_level=1)
    arr = image[..., 0] if image.shape[-1] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt.pillow, quality=quality or DEFAULT_QUALITY)
    return buf.getvalue()


def save_png(image: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image))
    return path
