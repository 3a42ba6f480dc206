"""Which patches ended up in the same token, drawn on the image (as in ToMe's figures).

Each image gets two panels: the input, and the input with every group of patches (the patches a
final token stands for) filled with the group's mean colour and outlined. Patches no token stands
for any more (pruned) are drawn dark.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def patch_owner(source: torch.Tensor, prefix: int) -> torch.Tensor:
    """(N_tokens, N0) membership -> for every input patch, the token that holds most of it, or -1."""
    patches = source[prefix:, prefix:]  # tokens x patches, prefix tokens never hold patches
    weight, owner = patches.max(dim=0)
    return torch.where(weight > 0, owner, torch.full_like(owner, -1))


def _panel(image: np.ndarray, owner: np.ndarray, grid: tuple[int, int], scale: int) -> np.ndarray:
    """image (H, W, 3) uint8, owner (gh*gw,) -> the grouped panel, upscaled by ``scale``."""
    h, w, _ = image.shape
    gh, gw = grid
    ph, pw = h // gh, w // gw
    owner_map = np.repeat(np.repeat(owner.reshape(gh, gw), ph, 0), pw, 1)
    out = image[:gh * ph, :gw * pw].astype(np.float32).copy()
    img = out.copy()
    for group in np.unique(owner_map):
        where = owner_map == group
        out[where] = img[where].mean(0) if group >= 0 else img[where] * 0.15
    out = np.repeat(np.repeat(out, scale, 0), scale, 1)
    big = np.repeat(np.repeat(owner_map, scale, 0), scale, 1)
    edge = np.zeros_like(big, dtype=bool)
    edge[1:, :] |= big[1:, :] != big[:-1, :]
    edge[:, 1:] |= big[:, 1:] != big[:, :-1]
    out[edge] = [255, 255, 255]
    return out.clip(0, 255).astype(np.uint8)


def save_merge_figure(path: Path | str, images: torch.Tensor, sources: torch.Tensor, prefix: int,
                      grid: tuple[int, int], columns: int = 3) -> Path:
    """images uint8 (n, C, H, W); sources (n, N_tokens, N0). Writes one PNG: per image, the input
    beside its groups, ``columns`` images per row."""
    from PIL import Image

    n = images.shape[0]
    panels = []
    for i in range(n):
        img = images[i].permute(1, 2, 0).numpy()
        if img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        scale = max(1, 224 // img.shape[0])
        owner = patch_owner(sources[i].float(), prefix).numpy()
        grouped = _panel(img, owner, grid, scale)
        original = np.repeat(np.repeat(img[:grouped.shape[0] // scale, :grouped.shape[1] // scale], scale, 0), scale, 1)
        gap = np.full((grouped.shape[0], 4, 3), 255, np.uint8)
        panels.append(np.concatenate([original, gap, grouped], axis=1))
    height = max(p.shape[0] for p in panels)
    width = max(p.shape[1] for p in panels)
    cells = [np.pad(p, ((0, height - p.shape[0] + 8), (0, width - p.shape[1] + 12), (0, 0)),
                    constant_values=255) for p in panels]
    per_row = min(columns, len(cells))
    cells += [np.full_like(cells[0], 255)] * (-len(cells) % per_row)
    rows = [np.concatenate(cells[i:i + per_row], axis=1) for i in range(0, len(cells), per_row)]
    canvas = np.concatenate(rows, axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(canvas).save(tmp, format="PNG")
    tmp.replace(path)
    return path
