"""The classical codecs a tokenizer must beat, through Pillow, over their whole quality range at
their strongest settings: JPEG (``optimize=True``), WebP (``method=6``), AVIF (libavif/aom,
``speed`` 0-10, lower is stronger) and JPEG XL (``pillow-jxl-plugin``, ``effort`` 1-10, higher
is stronger). Every size counted is the real file's, container and headers included: at 64x64
AVIF's HEIF boxes alone are a few hundred bytes, which is what such a file costs.
"""

from __future__ import annotations

import io

import torch
from PIL import Image

from tokctl.errors import UserError
from tokctl.imagetok.data import to_image, to_tensor

CODECS = {
    "jpeg": {"format": "JPEG", "options": {"optimize": True},
             "qualities": (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 70, 80, 90, 95)},
    "webp": {"format": "WEBP", "options": {"method": 6},
             "qualities": (0, 1, 2, 3, 5, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 70, 80, 90, 95, 100)},
    # speed 0 (the slowest, strongest) cost 1.3 s for one 64x64 photo here against 0.3 s at
    # speed 2, for files within 11 bytes at its floor (456 vs 445 B; at 256x256, speed 6 was
    # within 5 B of speed 2 at a ninth of the time): eval's avif_speed picks
    "avif": {"format": "AVIF", "options": {"speed": 2, "max_threads": 1},
             "qualities": (0, 5, 10, 15, 20, 25, 30, 40, 50, 60, 70, 80, 90)},
    # libjxl rejects qualities below 0 through this plugin; effort 9 costs ~0.03 s a 64x64 image
    "jxl": {"format": "JXL", "options": {"effort": 9, "num_threads": 1},
            "qualities": (0, 2, 5, 8, 10, 15, 20, 25, 30, 40, 50, 60, 70, 80, 90, 95)},
}
DEFAULT_CODECS = ("jpeg", "webp", "avif", "jxl")
# the option each codec's strength is set by (eval's config overrides it)
STRENGTH = {"jpeg": None, "webp": "method", "avif": "speed", "jxl": "effort"}


def available(codec: str) -> bool:
    if codec not in CODECS:
        return False
    if codec == "jxl":
        try:
            import pillow_jxl  # noqa: F401 - registers the JXL format with Pillow
        except ImportError:
            return False
    from PIL import features

    return codec == "jxl" or bool(features.check({"jpeg": "jpg", "webp": "webp",
                                                  "avif": "avif"}[codec]))


def check_codecs(codecs) -> tuple[list[str], list[str]]:
    """(the codecs asked for that this installation has, those it lacks with how to get them);
    a UserError for a name that is no codec."""
    have, missing = [], []
    for c in codecs:
        c = str(c)
        if c not in CODECS:
            raise UserError(f"classical codec {c!r}: known ones are {', '.join(CODECS)}")
        if available(c):
            have.append(c)
        else:
            missing.append(f"{c} (pip install pillow-jxl-plugin)" if c == "jxl"
                           else f"{c} (this Pillow was built without it)")
    return have, missing


def options(codec: str, strength: int | None = None) -> dict:
    opts = dict(CODECS[codec]["options"])
    if strength is not None and STRENGTH[codec]:
        opts[STRENGTH[codec]] = int(strength)
    return opts


def compress(im: Image.Image, codec: str, quality: int, opts: dict | None = None) -> bytes:
    spec = CODECS[codec]
    if codec == "jxl":
        import pillow_jxl  # noqa: F401
    buf = io.BytesIO()
    im.save(buf, format=spec["format"], quality=int(quality),
            **(spec["options"] if opts is None else opts))
    return buf.getvalue()


def decompress(data: bytes) -> Image.Image:
    if data[:2] == b"\xff\x0a" or data[4:8] == b"JXL ":  # a JPEG XL codestream or container
        import pillow_jxl  # noqa: F401
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def sweep(images: torch.Tensor, codec: str, opts: dict | None = None,
          progress=None) -> list[list[tuple[int, bytes, torch.Tensor]]]:
    """For each image, (quality, file bytes, decoded (3, H, W)) at every quality of the codec."""
    out = []
    for x in images:
        im = to_image(x)
        rows = []
        for q in CODECS[codec]["qualities"]:
            data = compress(im, codec, q, opts)
            rows.append((q, data, to_tensor(decompress(data))))
        out.append(rows)
        if progress is not None:
            progress()
    return out


def at_budget(per_image: list[list[tuple[int, bytes, torch.Tensor]]], budget: float):
    """Per image, the best quality whose file fits in ``budget`` bytes (rate control at the
    codec's finest step); when even the smallest file does not fit, the smallest, counted at its
    real (larger) size. Returns (qualities, sizes, decoded (N, 3, H, W), over_budget)."""
    qualities, sizes, decoded, over = [], [], [], 0
    for rows in per_image:
        fitting = [r for r in rows if len(r[1]) <= budget]
        if fitting:
            q, data, img = max(fitting, key=lambda r: (len(r[1]), r[0]))
        else:
            q, data, img = min(rows, key=lambda r: (len(r[1]), r[0]))
            over += 1
        qualities.append(q)
        sizes.append(len(data))
        decoded.append(img)
    return qualities, sizes, torch.stack(decoded), over
