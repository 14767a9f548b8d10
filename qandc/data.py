"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (IDX files), read with numpy only.

The reference model sees a 28x28 image padded with background (-1) to 32x32 and pixel-unshuffled by 2 into
4x16x16: 256 tokens at patch size 1, like DiT-XL/2 at 256², and four channels like a latent DiT.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import QandcError
from .readers import IDX_MAX_BYTES, open_regular

DATA_DIR = Path(os.environ.get("QANDC_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
SPLITS = {"train": "train", "test": "t10k"}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_SIZE, PADDED_SIZE, UNSHUFFLE = 28, 32, 2


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    with open_regular(path) as raw:
        try:
            with gzip.open(raw) if path.suffix == ".gz" else raw as f:
                data = f.read(IDX_MAX_BYTES + 1)  # a gzip bomb stops here
        except (OSError, EOFError, zlib.error) as e:
            raise QandcError(f"{path}: not a readable {'gzip ' if path.suffix == '.gz' else ''}file ({e})") from None
    if len(data) > IDX_MAX_BYTES:
        raise QandcError(f"{path}: unpacks to more than {IDX_MAX_BYTES >> 20} MB, more than an IDX file may have")
    if len(data) < 4 + 4 * ndim or data[:2] != b"\0\0" or data[2] != 0x08 or data[3] != ndim:
        raise QandcError(f"{path}: not an IDX file of unsigned bytes with {ndim} dimensions")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(shape):
        raise QandcError(f"{path}: truncated ({body.size} of {math.prod(shape)} values)")
    return body.reshape(shape).copy()  # writable, independent of the file buffer


def _find(stem: str, data_dir: Path) -> Path:
    for name in (f"{stem}.gz", stem):
        if (data_dir / name).is_file():
            return data_dir / name
    raise QandcError(f"Fashion-MNIST not found in {data_dir}: apt-get install dataset-fashion-mnist "
                     "(or set QANDC_FASHION_MNIST to a folder with the IDX files)")


def load_fashion_mnist(split: str = "train", data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels uint8 (N,)) of the 'train' (60k) or 'test' (10k) split."""
    if split not in SPLITS:
        raise QandcError(f"unknown split {split!r}; choose train or test")
    data_dir = Path(data_dir) if data_dir else DATA_DIR
    images = _read_idx(_find(f"{SPLITS[split]}-images-idx3-ubyte", data_dir), 3)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise QandcError(f"{data_dir}: the {split} split's images are {images.shape[1]}x{images.shape[2]}, not "
                         f"Fashion-MNIST's {IMAGE_SIZE}x{IMAGE_SIZE}")
    labels = _read_idx(_find(f"{SPLITS[split]}-labels-idx1-ubyte", data_dir), 1)
    if len(images) != len(labels):
        raise QandcError(f"{data_dir}: {len(images)} images but {len(labels)} labels in the {split} split")
    if labels.size and labels.max() >= len(CLASSES):
        raise QandcError(f"{data_dir}: the {split} split has label {labels.max()}; Fashion-MNIST's run from 0 to "
                         f"{len(CLASSES) - 1}")
    return images, labels


def images_to_model(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> model space (N, 4, 16, 16) in [-1, 1]."""
    pad = (PADDED_SIZE - IMAGE_SIZE) // 2
    x = images.float().div(127.5).sub(1).unsqueeze(1)
    return F.pixel_unshuffle(F.pad(x, (pad, pad, pad, pad), value=-1.0), UNSHUFFLE)
