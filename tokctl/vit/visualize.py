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


def merge_title(method_cfg, model: str) -> str:
    """``compress-vit tome (r=8) on vit: which input patches each final token stands for``."""
    from tokctl.plots import LEVEL_KEYS

    name = method_cfg.get("name", "?")
    level = ", ".join(f"{k}={method_cfg[k]}" for k in LEVEL_KEYS
                      if method_cfg.get(k) is not None and not hasattr(method_cfg[k], "keys"))
    return (f"compress-vit {name}" + (f" ({level})" if level else "") + f" on the {model} "
            f"model: which input patches each final token stands for")


def save_merge_figure(path: Path | str, images: torch.Tensor, sources: torch.Tensor, prefix: int,
                      grid: tuple[int, int], columns: int = 3, title: str | None = None) -> Path:
    """images uint8 (n, C, H, W); sources (n, N_tokens, N0). Writes one PNG that reads alone:
    a title (``title``, e.g. the method and its setting), per image the input beside its groups
    with how many tokens stand for how many patches, a legend and a caption saying how to read
    the groups; ``columns`` images per row."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from tokctl.runs import atomic_write_bytes

    n = images.shape[0]
    per_row = min(columns, n)
    rows = -(-n // per_row)
    height = 2.45 * rows + 1.0  # inches: the rows, the title, and 0.6 for the legend below
    fig, axes = plt.subplots(rows, 2 * per_row, figsize=(2.3 * 2 * per_row, height),
                             squeeze=False)
    patches = grid[0] * grid[1]
    any_pruned = False
    for i in range(rows * per_row):
        a, b = axes[i // per_row][2 * (i % per_row)], axes[i // per_row][2 * (i % per_row) + 1]
        a.axis("off")
        b.axis("off")
        if i >= n:
            continue
        img = images[i].permute(1, 2, 0).numpy()
        if img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        scale = max(1, 224 // img.shape[0])
        owner = patch_owner(sources[i].float(), prefix).numpy()
        grouped = _panel(img, owner, grid, scale)
        original = np.repeat(np.repeat(img[:grouped.shape[0] // scale, :grouped.shape[1] // scale],
                                       scale, 0), scale, 1)
        groups = len(np.unique(owner[owner >= 0]))
        pruned = int((owner < 0).sum())
        any_pruned |= pruned > 0
        a.imshow(original, interpolation="nearest")
        a.set_title(f"image {i + 1}: input", fontsize=8)
        b.imshow(grouped, interpolation="nearest")
        b.set_title(f"{patches - pruned} patches in {groups} groups"
                    + (f", {pruned} pruned" if pruned else ""), fontsize=8)
    fig.suptitle(title or "Which input patches each final token stands for", fontsize=11)
    handles = [Patch(facecolor="#b0b0b0", edgecolor="white", linewidth=2,
                     label="a group: the patches one final token stands for most, filled with "
                           "their mean colour, outlined in white")]
    if any_pruned:
        handles.append(Patch(facecolor="#262626", edgecolor="black",
                             label="pruned patch (darkened): no token stands for it any more"))
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=1,
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.6 / height, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
