"""Reconstruction losses and image-quality metrics on (B, 3, H, W) tensors in [0, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim

# MS-SSIM's standard five scales need images larger than 160 px; 64x64 images keep the first
# three scales (weights renormalised) with a 7-pixel window. Stated beside every figure.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001)
MS_SSIM_WIN = 7


def ssim_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ssim(x, y, data_range=1.0, size_average=False)


def ms_ssim_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MS-SSIM (Wang et al. 2003) over len(MS_SSIM_WEIGHTS) scales: contrast-structure terms at
    the finer scales, full SSIM at the coarsest, combined as a weighted geometric mean.
    pytorch_msssim's own ms_ssim insists on five scales' worth of pixels, so the scales are
    composed here from its single-scale terms."""
    from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim

    w = torch.tensor(MS_SSIM_WEIGHTS, dtype=x.dtype)
    w = w / w.sum()
    win = _fspecial_gauss_1d(MS_SSIM_WIN, 1.5).repeat(x.shape[1], 1, 1, 1).to(x.dtype)
    terms = []
    for level in range(len(w)):
        ssim_c, cs_c = _ssim(x, y, data_range=1.0, win=win, size_average=False)
        if level < len(w) - 1:
            terms.append(torch.relu(cs_c))
            pad = [d % 2 for d in x.shape[2:]]
            x, y = F.avg_pool2d(x, 2, padding=pad), F.avg_pool2d(y, 2, padding=pad)
    terms.append(torch.relu(ssim_c))
    stacked = torch.stack(terms, dim=0)  # (levels, B, C)
    return torch.prod(stacked ** w.view(-1, 1, 1), dim=0).mean(1)


def psnr_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    mse = ((x - y) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, l1: float, l2: float,
                        ssim_weight: float) -> tuple[torch.Tensor, dict]:
    parts = {}
    loss = recon.new_zeros(())
    if l1:
        parts["l1"] = F.l1_loss(recon, target)
        loss = loss + l1 * parts["l1"]
    if l2:
        parts["l2"] = F.mse_loss(recon, target)
        loss = loss + l2 * parts["l2"]
    if ssim_weight:
        parts["ssim"] = ssim(recon.clamp(0, 1), target, data_range=1.0, size_average=True)
        loss = loss + ssim_weight * (1 - parts["ssim"])
    return loss, {k: float(v.detach()) for k, v in parts.items()}
