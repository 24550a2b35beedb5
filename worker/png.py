"""PNG encoding with Pillow (kept here so that workers never import torch)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_png(image: np.ndarray) -> bytes:
    """[H, W, C] uint8 with C in (1, 3) -> PNG bytes."""
    arr = image[..., 0] if image.shape[-1] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
