"""The image formats a job's results can be written in. No torch, no numpy: the HTTP layer
validates and names files with this table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

OutputFormat = Literal["png", "jpeg", "webp"]
DEFAULT_QUALITY = 90
"""JPEG and WebP quality (Pillow's 1..100 scale) when a job does not say."""


@dataclass(frozen=True)
class ImageFormat:
    name: OutputFormat
    pillow: str  # Pillow's format name
    media_type: str
    suffix: str
    lossy: bool


IMAGE_FORMATS: dict[str, ImageFormat] = {
    f.name: f
    for f in (
        ImageFormat("png", "PNG", "image/png", ".png", lossy=False),
        ImageFormat("jpeg", "JPEG", "image/jpeg", ".jpg", lossy=True),
        ImageFormat("webp", "WEBP", "image/webp", ".webp", lossy=True),
    )
}


def media_type_of(key: str) -> str:
    """The media type of an object key or file name by its suffix (image/png when unknown)."""
    for fmt in IMAGE_FORMATS.values():
        if key.endswith(fmt.suffix):
            return fmt.media_type
    return "image/png"
