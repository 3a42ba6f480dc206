"""Images to evaluate on: the default dataset (Fashion-MNIST's test split, shipped), an image
folder (datasets' imagefolder: one subfolder per class, or unlabelled), a datasets-library
dataset saved to disk, or synthetic noise for speed-only runs.

Every source yields uint8 batches (B, C, H, W) already at the model's size and channel count,
labels in the model's label space (-1 where unknown) and names; :func:`to_model_input` turns a
batch into the model's normalised float input. Images that do not decode are skipped, counted
and named, never fatal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tokctl.errors import UNREADABLE_FILE, UserError, one_line_error
from tokctl.imagefolder import check_image_folder, read_image_folder

# What PIL raises for a truncated, damaged or mislabelled file (and for an absurdly large one).
BAD_IMAGE = (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError)


@dataclass
class Batch:
    images: torch.Tensor  # uint8 (B, C, H, W)
    labels: torch.Tensor  # int64 (B,), -1 = unknown
    names: list[str]


@dataclass
class ImageSource:
    """A fixed, ordered list of images; ``load(i)`` gives one (C, H, W) uint8 or raises."""

    description: str
    names: list[str]
    labels: list[int]  # in the model's label space, -1 = unknown
    loader: Any  # callable(index) -> uint8 tensor (C, H, W)
    has_labels: bool
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why, each bad image once

    def __len__(self) -> int:
        return len(self.names)

    def batches(self, batch_size: int, indices: list[int]) -> Iterator[Batch]:
        for start in range(0, len(indices), batch_size):
            images, labels, names = [], [], []
            for i in indices[start:start + batch_size]:
                try:
                    images.append(self.loader(i))
                except BAD_IMAGE as exc:  # a file that is no image: skipped and named
                    self.skipped.setdefault(self.names[i], one_line_error(exc))
                    continue
                labels.append(self.labels[i])
                names.append(self.names[i])
            if images:
                yield Batch(torch.stack(images), torch.tensor(labels, dtype=torch.long), names)


def to_model_input(images: torch.Tensor, info) -> torch.Tensor:
    mean = torch.tensor(info.mean, dtype=torch.float32)[None, :, None, None]
    std = torch.tensor(info.std, dtype=torch.float32)[None, :, None, None]
    return (images.float() / 255.0 - mean) / std


def _fit(image: torch.Tensor, info) -> torch.Tensor:
    """uint8 (C, H, W) -> the model's channels and square size (resize the short side, centre crop)."""
    c = image.shape[0]
    if c != info.num_channels:
        if info.num_channels == 1:
            weights = torch.tensor([0.299, 0.587, 0.114])[:c, None, None]
            image = (image.float() * weights / weights.sum()).sum(0, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        elif c == 1:
            image = image.expand(info.num_channels, -1, -1)
        else:
            image = image[:info.num_channels]
    size = info.image_size
    h, w = image.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        image = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", antialias=True,
                              align_corners=False)[0]
        top, left = (nh - size) // 2, (nw - size) // 2
        image = image[:, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)
    return image.contiguous()


def _decode(path: Path, channels: int) -> torch.Tensor:
    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _norm_name(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def map_class_names(names: list[str], info) -> tuple[dict[str, int] | None, list[str]]:
    """Folder or dataset class names -> the model's label ids, when every one matches a label
    (case, spaces and punctuation ignored; a number is taken as an id)."""
    if not info.id2label:
        return None, names
    by_name = {}
    for idx, label in info.id2label.items():
        for alias in str(label).split(","):
            by_name.setdefault(_norm_name(alias), idx)
    mapping, unmatched = {}, []
    for name in names:
        key = _norm_name(name)
        if key in by_name:
            mapping[name] = by_name[key]
        elif name.isdigit() and int(name) in info.id2label:
            mapping[name] = int(name)
        else:
            unmatched.append(name)
    return (mapping if not unmatched else None), unmatched


# ------------------------------------------------------------------------------------- sources
def fashion_mnist_source(cfg, info) -> ImageSource:
    from tokctl.vit import fashion_mnist

    images, labels = fashion_mnist.load(cfg.get("split", "test"), cfg.get("root"))
    label_list = labels.tolist()
    has_labels = info.family == "default" or bool(info.id2label)
    if info.family != "default":
        mapping, _ = map_class_names(list(fashion_mnist.CLASSES), info)
        has_labels = mapping is not None
        label_list = [mapping[fashion_mnist.CLASSES[y]] for y in label_list] if has_labels else [-1] * len(label_list)

    def load(i: int) -> torch.Tensor:
        return _fit(images[i][None], info)

    names = [f"fashion-mnist/{cfg.get('split', 'test')}/{i}" for i in range(len(images))]
    return ImageSource("Fashion-MNIST " + cfg.get("split", "test"), names, label_list, load, has_labels)


def folder_source(cfg, info) -> ImageSource:
    """An image folder through datasets' imagefolder: labelled when it has one subfolder per
    class and every class name matches one of the model's labels."""
    if not cfg.get("path"):
        raise UserError("data=folder needs data.path=FOLDER (images, or one subfolder of images per class)")
    folder = read_image_folder(cfg.path)
    labels, has_labels, notes = [-1] * len(folder.files), False, []
    if folder.labels is not None:
        mapping, unmatched = map_class_names(folder.classes, info)
        if mapping is None:
            notes.append(f"class folders do not match the model's labels (unmatched: "
                         f"{', '.join(unmatched[:5])}{'...' if len(unmatched) > 5 else ''}); top-1 not measured")
        else:
            labels, has_labels = [mapping[folder.classes[y]] for y in folder.labels], True
    files = folder.files

    def load(i: int) -> torch.Tensor:
        return _fit(_decode(files[i], info.num_channels), info)

    return ImageSource(f"folder {folder.root}", folder.names, labels, load, has_labels, notes)


def hf_disk_source(cfg, info) -> ImageSource:
    if not cfg.get("path"):
        raise UserError("data=hf_disk needs data.path=FOLDER written by datasets' save_to_disk")
    path = Path(str(cfg.path)).expanduser()
    if not path.exists():
        raise UserError(f"data.path={cfg.path} does not exist")
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except UNREADABLE_FILE as exc:  # not a saved dataset, or a damaged one
        raise UserError(f"could not read a saved dataset at {path}: {one_line_error(exc)}") from None
    if isinstance(ds, datasets.DatasetDict):
        split = cfg.get("split") or ("test" if "test" in ds else next(iter(ds)))
        if split not in ds:
            raise UserError(f"data.split={split} not in the dataset's splits: {', '.join(ds)}")
        ds = ds[split]
    image_key = cfg.get("image_key") or next(
        (k for k, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    if image_key is None or image_key not in ds.features:
        raise UserError(f"no image column in the dataset (columns: {', '.join(ds.features)}); set data.image_key")
    label_key = cfg.get("label_key") or next(
        (k for k, f in ds.features.items() if isinstance(f, datasets.ClassLabel)), None)
    labels, has_labels, notes = [-1] * len(ds), False, []
    if label_key is not None and label_key in ds.features:
        feature = ds.features[label_key]
        names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        if names:
            mapping, unmatched = map_class_names(names, info)
            if mapping is not None:
                labels = [mapping[names[y]] for y in ds[label_key]]
                has_labels = True
            else:
                notes.append(f"dataset labels do not match the model's (unmatched: {', '.join(unmatched[:5])})")
    if len(ds) == 0:
        raise UserError(f"the dataset at {path} is empty")

    def load(i: int) -> torch.Tensor:
        img = ds[i][image_key].convert("L" if info.num_channels == 1 else "RGB")
        arr = np.asarray(img, dtype=np.uint8)
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        return _fit(torch.from_numpy(arr.copy()).permute(2, 0, 1), info)

    return ImageSource(f"dataset {path}", [f"{path.name}/{i}" for i in range(len(ds))], labels, load,
                       has_labels, notes)


def synthetic_source(cfg, info) -> ImageSource:
    n = int(cfg.get("num_images", 64))
    if n < 1:
        raise UserError("data.num_images must be >= 1")
    seed = int(cfg.get("seed", 0))

    def load(i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        return torch.randint(0, 256, (info.num_channels, info.image_size, info.image_size),
                             generator=g, dtype=torch.uint8)

    return ImageSource("synthetic noise", [f"noise/{i}" for i in range(n)], [-1] * n, load, False)


SOURCES = {"fashion_mnist": fashion_mnist_source, "folder": folder_source, "hf_disk": hf_disk_source,
           "synthetic": synthetic_source}


def check_early(cfg) -> None:
    """Checks that need no model, run before loading one."""
    kind = cfg.get("kind")
    if kind not in SOURCES:
        raise UserError(f"data.kind={kind} is not one of {', '.join(SOURCES)}")
    if kind in ("folder", "hf_disk"):
        if not cfg.get("path"):
            raise UserError(f"data={kind} needs data.path=FOLDER")
        if kind == "folder":
            check_image_folder(cfg.path)
        elif not Path(str(cfg.path)).expanduser().exists():
            raise UserError(f"data.path={cfg.path} does not exist")
    limit = cfg.get("limit")
    if limit is not None and int(limit) < 1:
        raise UserError(f"data.limit={limit} must be >= 1 (or null for all)")


def open_source(cfg, info) -> ImageSource:
    check_early(cfg)
    return SOURCES[cfg.kind](cfg, info)
