"""Training data: IDX files (the MNIST format) or a folder of images, as tensors in [-1, 1]."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
_IDX_DTYPES = {0x08: np.uint8}


class DatasetError(ValueError):
    """A training data file or folder that cannot be read; the message names it."""


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed): big-endian magic (0, 0, dtype, ndim),
    ndim int32 sizes, then the payload. Returns an array of those sizes."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read IDX file ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"{path}: not an IDX file (bad magic)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code not in _IDX_DTYPES:
        raise DatasetError(f"{path}: unsupported IDX element type 0x{dtype_code:02x}")
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}i", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DatasetError(f"{path}: payload has {len(raw) - header} bytes, header says {expected}")
    return np.frombuffer(raw, dtype=_IDX_DTYPES[dtype_code], offset=header).reshape(dims)


def load_idx_dataset(images: str | Path, labels: str | Path | None = None) -> tuple[Tensor, Tensor | None]:
    """IDX images [N, H, W] uint8 (+ labels [N]) -> ([N, 1, H, W] float in [-1, 1], [N] long)."""
    arr = read_idx(images)
    if arr.ndim != 3:
        raise DatasetError(f"{images}: expected N x H x W images, got shape {arr.shape}")
    x = torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0)[:, None]
    y = None
    if labels is not None:
        lab = read_idx(labels)
        if lab.shape != (arr.shape[0],):
            raise DatasetError(f"{labels}: {lab.shape[0]} labels for {arr.shape[0]} images")
        y = torch.from_numpy(lab.astype(np.int64))
    return x, y


def load_image_folder(folder: str | Path, image_size: int, channels: int) -> tuple[Tensor, Tensor | None]:
    """Every image under folder, resized to image_size. Sub-folders, if every image sits in one,
    are the classes (sorted by name). Returns ([N, C, S, S] in [-1, 1], [N] long or None)."""
    from PIL import Image

    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for p in files:
        try:
            with Image.open(p) as im:
                im = im.convert(mode).resize((image_size, image_size), Image.BICUBIC)
                arrays.append(np.asarray(im, dtype=np.float32).reshape(image_size, image_size, channels))
        except OSError as e:
            raise DatasetError(f"{p}: cannot decode image ({e})") from e
    x = torch.from_numpy(np.stack(arrays) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()
    parents = [p.parent for p in files]
    if all(par != folder for par in parents):
        classes = sorted({par.name for par in parents})
        index = {c: i for i, c in enumerate(classes)}
        return x, torch.tensor([index[par.name] for par in parents])
    return x, None
