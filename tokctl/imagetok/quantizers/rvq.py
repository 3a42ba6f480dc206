"""Residual vector quantisation: ``depth`` VQ stages, each coding what the previous ones left.

Each latent vector becomes ``depth`` ids, coarse to fine; the token stream holds them position by
position, so dropping the tail of the stream drops the finest stages of the last position first.
"""

from __future__ import annotations

import torch

from tokctl.imagetok.quantizers.base import Quantized, Quantizer
from tokctl.imagetok.quantizers.vq import VectorQuantizer


class ResidualVQ(Quantizer):
    def __init__(self, codebook_size: int = 1024, dim: int = 12, depth: int = 2,
                 beta: float = 0.25, decay: float = 0.99, kmeans_init: bool = True,
                 dead_code_threshold: float = 0.03):
        super().__init__()
        if depth < 1:
            raise ValueError("ResidualVQ needs depth >= 1")
        self.codebook_size, self.dim, self.depth = int(codebook_size), int(dim), int(depth)
        # Residuals shrink stage by stage: unnormalised (Euclidean) codes, so each stage can
        # match the scale of what is left.
        self.stages = torch.nn.ModuleList(
            VectorQuantizer(codebook_size, dim, normalize=False, beta=beta, ema=True, decay=decay,
                            kmeans_init=kmeans_init, dead_code_threshold=dead_code_threshold)
            for _ in range(self.depth))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return sum(stage.embed(ids[..., i:i + 1]) for i, stage in enumerate(self.stages))

    def forward(self, z: torch.Tensor) -> Quantized:
        residual = z
        total = torch.zeros_like(z)
        ids, loss = [], z.new_zeros(())
        for stage in self.stages:
            q = stage(residual)
            total = total + q.values.detach()
            residual = residual - q.values.detach()
            ids.append(q.ids)
            loss = loss + q.loss
        values = z + (total - z).detach()
        ids = torch.cat(ids, dim=-1)
        self.count_usage(ids)
        return Quantized(values, ids, loss, {})
