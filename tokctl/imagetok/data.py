"""Photos for training and evaluation.

Training reads every image under the configured folders (by default the photographic wallpapers
that Debian's desktop packages install, see scripts/setup.sh) and draws random square crops at
random scales, resized to the tokenizer's size, with horizontal flips: a crop of a whole photo
looks like a thumbnail, a small crop like a detail, and both are what 64x64 images are.

Evaluation uses whole photos, centre-cropped to a square and resized: a folder of images (read
through datasets' imagefolder; a file that does not open is left out, named and counted), or by
default the photos bundled with scikit-image and matplotlib, none of which is in the training
folders (they are the held-out set).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tokctl.console import console
from tokctl.errors import UserError, one_line_error
from tokctl.imagefolder import read_image_folder

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm"}
# Files in the wallpaper packages that are not photographs of anything (previews, logos).
SKIP_NAMES = ("screenshot", "logo", "symbolic")

# Held-out photos bundled with scikit-image (and matplotlib's Grace Hopper): never trained on.
HELD_OUT = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina",
            "immunohistochemistry", "stereo_motorcycle", "grace_hopper", "camera", "coins",
            "clock", "moon", "brick", "grass", "gravel")


def image_files(folder: Path | str) -> list[Path]:
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        return []
    files = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
             and not any(s in p.name.lower() for s in SKIP_NAMES)]
    return sorted(_one_size_each(files))


def _one_size_each(files: list[Path]) -> list[Path]:
    """Wallpaper packages ship one picture at many sizes (``1920x1080.jpg``, ``640x480.jpg`` in
    one folder): keep the largest, so no picture counts ten times."""
    sized: dict[Path, tuple[int, Path]] = {}
    out = []
    for f in files:
        m = re.fullmatch(r"(\d+)x(\d+)", f.stem)
        if m is None:
            out.append(f)
            continue
        area = int(m.group(1)) * int(m.group(2))
        if f.parent not in sized or area > sized[f.parent][0]:
            sized[f.parent] = (area, f)
    return out + [f for _, f in sized.values()]


def open_rgb(path: Path | str) -> Image.Image:
    """An RGB PIL image, or UserError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            return im.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{path}: cannot be opened as an image ({exc})") from None


def square_thumbnail(im: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square, then resize with a proper low-pass (Lanczos)."""
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return im.crop((left, top, left + s, top + s)).resize((size, size), Image.LANCZOS)


def to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


def to_image(x: torch.Tensor) -> Image.Image:
    arr = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


# ------------------------------------------------------------------------------------ training
class CropSampler:
    """Random square crops (side log-uniform between ``size`` and the photo's short side), resized
    to ``size``, flipped left-right half the time, and turned grey with probability
    ``grayscale`` (the wallpapers are all in colour; black-and-white photos are not rare). Photos
    are kept in memory at most ``max_side`` pixels on their short side.

    ``texture=k`` (k > 1) weights texture-rich crops: k candidate crops are drawn and one is kept
    with probability proportional to its gradient energy (:func:`texture_score`), so a crop of
    fur or foliage is kept far more often than one of sky. Most of a photo's area is smooth (and
    so is most of a crop drawn uniformly), yet the details are what a small tokenizer fails on;
    k = 1 draws uniformly."""

    def __init__(self, folders: list[str], size: int, max_side: int = 384, seed: int = 0,
                 min_photos: int = 1, photos: list[Image.Image] | None = None,
                 grayscale: float = 0.0, texture: int = 1):
        self.size = size
        self.rng = random.Random(seed)
        self.grayscale = float(grayscale)
        self.texture = max(1, int(texture))
        self.skipped: dict[str, str] = {}  # photos that would not open: name -> why
        if photos is not None:  # another sampler's photos, drawn with another seed
            self.photos, self.files = photos, []
            return
        files = [f for folder in folders for f in image_files(folder)]
        self.photos: list[Image.Image] = []
        for f in files:
            try:
                im = open_rgb(f)
            except UserError as exc:
                self.skipped[str(f)] = str(exc)
                continue
            short = min(im.size)
            if short < size:
                continue
            if short > max_side:
                scale = max_side / short
                im = im.resize((max(size, round(im.size[0] * scale)),
                                max(size, round(im.size[1] * scale))), Image.LANCZOS)
            self.photos.append(im)
        if len(self.photos) < min_photos:
            raise UserError(f"found {len(self.photos)} usable photos (at least {size}px) under "
                            f"{', '.join(map(str, folders))}; point data.folders at image folders "
                            f"(scripts/setup.sh installs the default wallpaper photos)")
        self.files = files

    def sample(self) -> Image.Image:
        if self.texture == 1:
            return self._crop()
        crops = [self._crop() for _ in range(self.texture)]
        scores = [texture_score(c) + 1e-3 for c in crops]  # a flat crop keeps a small chance
        return self.rng.choices(crops, weights=scores)[0]

    def _crop(self) -> Image.Image:
        im = self.photos[self.rng.randrange(len(self.photos))]
        w, h = im.size
        short = min(w, h)
        side = int(round(self.size * (short / self.size) ** self.rng.random()))
        left, top = self.rng.randint(0, w - side), self.rng.randint(0, h - side)
        crop = im.crop((left, top, left + side, top + side))
        crop = crop.resize((self.size, self.size), Image.BILINEAR if side < 2 * self.size
                           else Image.BOX if side > 4 * self.size else Image.LANCZOS)
        if self.rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        if self.grayscale and self.rng.random() < self.grayscale:
            crop = crop.convert("L").convert("RGB")
        return crop

    def batch(self, n: int) -> torch.Tensor:
        return torch.stack([to_tensor(self.sample()) for _ in range(n)])


def texture_score(im: Image.Image) -> float:
    """Gradient energy: the mean absolute difference between neighbouring grey levels (0-1
    scale), about 0.01 for sky and 0.1-0.2 for fur, foliage or brickwork."""
    g = np.asarray(im.convert("L"), dtype=np.float32) / 255
    return float(np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean()) / 2


def warn_skipped(sampler: CropSampler) -> None:
    if sampler.skipped:
        first = next(iter(sampler.skipped.values()))
        console.print(f"[yellow]warning[/]: {len(sampler.skipped)} training photo(s) would not "
                      f"open and are left out (first: {first})", soft_wrap=True)


# ---------------------------------------------------------------------------------- evaluation
def held_out_photos() -> tuple[list[tuple[str, Image.Image]], dict[str, str]]:
    """The bundled held-out photos, as (name, RGB image); and those that could not be had (some
    need a download scikit-image cannot make offline), name -> why."""
    try:
        import skimage.data as sk
    except ImportError as exc:
        raise UserError("the default evaluation photos come with scikit-image: "
                        "pip install scikit-image (or give data.path=FOLDER)") from exc
    out, skipped = [], {}
    for name in HELD_OUT:
        try:
            if name == "grace_hopper":
                from matplotlib import cbook

                with cbook.get_sample_data("grace_hopper.jpg") as f:
                    im = Image.open(f).convert("RGB")
            else:
                arr = getattr(sk, name)()
                if name == "stereo_motorcycle":
                    arr = arr[0]
                im = Image.fromarray(np.asarray(arr)).convert("RGB")
        except (ImportError, OSError, ValueError) as exc:  # a photo it would have to download
            skipped[name] = one_line_error(exc)
            continue
        out.append((name, im))
    return out, skipped


PHOTO_SETS = ("default", "textured", "opencv")


def eval_images(path: str | None, size: int, limit: int | None = None, photos: str = "default"
                ) -> tuple[list[str], torch.Tensor, dict[str, str]]:
    """Names and a (N, 3, size, size) tensor of whole photos (centre square, resized); and the
    photos left out, name -> why: files in data.path that do not open as images (a folder is read
    through datasets' imagefolder), or default photos this machine cannot have. Without a path,
    ``photos`` picks the held-out set: ``default`` (scikit-image and matplotlib), ``textured``
    (the jigsaw games' photos) or ``opencv`` (opencv-doc's; :mod:`tokctl.imagetok.photosets`)."""
    if photos not in PHOTO_SETS:
        raise UserError(f"data.photos={photos}: give one of {', '.join(PHOTO_SETS)}")
    if path:
        folder = read_image_folder(path, labels=False)  # whole photos: classes play no part
        pairs, skipped = [], {}
        for name, f in zip(folder.names, folder.files):
            if limit and len(pairs) == limit:
                break
            try:
                pairs.append((name, open_rgb(f)))
            except UserError as exc:
                skipped[name] = str(exc)
        if not pairs:
            raise UserError(f"data.path={path}: none of its images opens (first: "
                            f"{next(iter(skipped.values()))})")
    else:
        if photos != "default":
            from tokctl.imagetok.photosets import held_out_set

            pairs, skipped = held_out_set(photos)
        else:
            pairs, skipped = held_out_photos()
        pairs = pairs[:limit] if limit else pairs
    names = [n for n, _ in pairs]
    if not pairs:
        raise UserError("no evaluation images" + (f" (the default photos could not be loaded: "
                                                  f"{next(iter(skipped.values()))})" if skipped else ""))
    return names, torch.stack([to_tensor(square_thumbnail(im, size)) for _, im in pairs]), skipped
