"""A folder of images, listed by datasets' ``imagefolder`` builder: which files count as images,
in which order, and each one's class where the folder has one subfolder per class (imagefolder's
rule: two or more subfolders, every image at the same depth).

Files are only listed here, never decoded: a file that will not open is the reader's to skip,
name and count (``images_skipped``), so that one bad file does not end a run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tokctl.errors import UserError


@dataclass
class ImageFolder:
    root: Path
    files: list[Path]
    labels: list[int] | None  # each file's index into ``classes``; None: unlabelled
    classes: list[str]

    @property
    def names(self) -> list[str]:
        base = self.root if self.root.is_dir() else self.root.parent
        return [str(f.relative_to(base)) for f in self.files]


def _datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    return datasets


def extensions() -> frozenset[str]:
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder as Builder

    return frozenset(Builder.EXTENSIONS)


def check_image_folder(path, key: str = "data.path") -> Path:
    """The one-line errors, before anything loads: a path that is not there, or no image in it."""
    root = Path(str(path)).expanduser()
    if not root.exists():
        raise UserError(f"{key}={path} does not exist")
    exts = extensions()
    found = [root] if root.is_file() else (
        f for _, _, files in os.walk(root) for f in files)
    if not any(Path(f).suffix.lower() in exts for f in found):
        raise UserError(f"{key}={path} holds no images (no file with an image extension such as "
                        f".png, .jpg, .webp)")
    return root


def read_image_folder(path, key: str = "data.path", labels: bool = True) -> ImageFolder:
    """Every image under ``path`` (a folder, or one image file) in imagefolder's order. Its Arrow
    index goes under tokctl's cache folder ($TOKCTL_CACHE_DIR), not ~/.cache; a packaged builder
    on local files never reaches for the hub."""
    from tokctl.models.loading import cache_dir

    root = check_image_folder(path, key)
    datasets = _datasets()
    where = {"data_files": [str(root)]} if root.is_file() else {"data_dir": str(root)}
    try:
        ds = datasets.load_dataset("imagefolder", split="train", drop_metadata=True,
                                   drop_labels=None if labels else True,
                                   cache_dir=str(cache_dir() / "datasets"), **where)
    except datasets.data_files.EmptyDatasetError:  # only hidden files: imagefolder skips them
        raise UserError(f"{key}={path} holds no images (hidden files and folders are "
                        f"skipped)") from None
    listed = ds.cast_column("image", datasets.Image(decode=False))["image"]  # paths, not pixels
    files = [Path(x["path"]) for x in listed]
    label = ds.features.get("label")
    if label is None:
        return ImageFolder(root, files, None, [])
    return ImageFolder(root, files, list(ds["label"]), list(label.names))
