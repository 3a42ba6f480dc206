"""Reconstruction losses and image-quality metrics on (B, 3, H, W) tensors in [0, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim, ssim

# MS-SSIM's standard five scales need images larger than 160 px; 64x64 images keep the first
# three scales (weights renormalised) with a 7-pixel window. Stated beside every figure.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001)
MS_SSIM_WIN = 7


def ssim_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ssim(x, y, data_range=1.0, size_average=False)


def ms_ssim_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(MS_SSIM_WEIGHTS)
    return ms_ssim(x, y, data_range=1.0, size_average=False, win_size=MS_SSIM_WIN,
                   weights=(w / w.sum()).tolist())


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
