"""Fashion-MNIST, the embedded default's dataset: the test split ships inside tokctl, the training
split comes from Debian's ``dataset-fashion-mnist`` package (or any folder with the four files)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from tokctl.errors import UserError

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Pixel statistics of the training split, used to normalise every input of the default model.
MEAN, STD = 0.2860, 0.3530
SHIPPED = Path(__file__).resolve().parent / "assets" / "fashion-mnist"
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _read_idx(path: Path) -> np.ndarray:
    """The IDX format: magic (0, 0, dtype code 8 = uint8, number of dims), big-endian sizes, data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise UserError(f"{path} is not an uint8 IDX file (Fashion-MNIST format)")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserError(f"{path} is truncated: expected {int(np.prod(dims))} values, "
                        f"found {data.size}")
    return data.reshape(*dims)


def find_split(split: str, root: str | Path | None = None) -> Path:
    if split not in _FILES:
        raise UserError(f"unknown Fashion-MNIST split {split!r}; use train or test")
    candidates = [Path(root).expanduser()] if root else [SHIPPED, DEBIAN]
    for folder in candidates:
        if all((folder / name).is_file() for name in _FILES[split]):
            return folder
    where = ", ".join(str(c) for c in candidates)
    raise UserError(f"Fashion-MNIST {split} split not found in {where}; install it with "
                    f"`apt-get install dataset-fashion-mnist` or set data.root=FOLDER holding "
                    f"{' and '.join(_FILES[split])}")


def load(split: str, root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 (N, 28, 28) and labels as int64 (N,)."""
    folder = find_split(split, root)
    images_file, labels_file = _FILES[split]
    images = _read_idx(folder / images_file)
    labels = _read_idx(folder / labels_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"{folder}: images {images.shape} and labels {labels.shape} do not match")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, H, W), standardised as the default model expects."""
    x = images_uint8.float().div_(255.0).unsqueeze(1)
    return (x - MEAN) / STD
