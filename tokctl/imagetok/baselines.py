"""JPEG and WebP through Pillow at their strongest settings (JPEG ``optimize=True``, WebP
``method=6``), over their whole quality range: the classical codecs a tokenizer must beat."""

from __future__ import annotations

import io

import torch
from PIL import Image

from tokctl.imagetok.data import to_image, to_tensor

CODECS = {
    "jpeg": {"format": "JPEG", "options": {"optimize": True},
             "qualities": (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 70, 80, 90, 95)},
    "webp": {"format": "WEBP", "options": {"method": 6},
             "qualities": (0, 1, 2, 3, 5, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 70, 80, 90, 95, 100)},
}


def compress(im: Image.Image, codec: str, quality: int) -> bytes:
    spec = CODECS[codec]
    buf = io.BytesIO()
    im.save(buf, format=spec["format"], quality=int(quality), **spec["options"])
    return buf.getvalue()


def decompress(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def sweep(images: torch.Tensor, codec: str) -> list[list[tuple[int, bytes, torch.Tensor]]]:
    """For each image, (quality, file bytes, decoded (3, H, W)) at every quality of the codec."""
    out = []
    for x in images:
        im = to_image(x)
        rows = []
        for q in CODECS[codec]["qualities"]:
            data = compress(im, codec, q)
            rows.append((q, data, to_tensor(decompress(data))))
        out.append(rows)
    return out


def at_budget(per_image: list[list[tuple[int, bytes, torch.Tensor]]], budget: float):
    """Per image, the best quality whose file fits in ``budget`` bytes (rate control at the
    codec's finest step); when even the lowest quality does not fit, the lowest quality, counted
    at its real (larger) size. Returns (qualities, sizes, decoded (N, 3, H, W), over_budget)."""
    qualities, sizes, decoded, over = [], [], [], 0
    for rows in per_image:
        fitting = [r for r in rows if len(r[1]) <= budget]
        if fitting:
            q, data, img = max(fitting, key=lambda r: (len(r[1]), r[0]))
        else:
            q, data, img = min(rows, key=lambda r: len(r[1]))
            over += 1
        qualities.append(q)
        sizes.append(len(data))
        decoded.append(img)
    return qualities, sizes, torch.stack(decoded), over
