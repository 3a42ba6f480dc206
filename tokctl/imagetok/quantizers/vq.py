"""Vector quantisation with a learned codebook (VQ-VAE), in TiTok / ViT-VQGAN's factorised form:
the encoder output is projected to a low dimension (done by the model) and both it and the codes
are l2-normalised, so the nearest code is the most similar direction.

Against codebook collapse, as the field does: k-means initialisation of the codebook on the first
training batch, EMA codebook updates (instead of a codebook loss), and restarts of dead codes
(codes whose running usage falls below a threshold are moved onto random encoder outputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokctl.kernels.nearest_code import nearest_code
from tokctl.imagetok.quantizers.base import Quantized, Quantizer


def kmeans(x: torch.Tensor, k: int, iters: int = 10, normalize: bool = False) -> torch.Tensor:
    """Plain Lloyd's k-means (k-means++-free: random distinct rows to start); rows of ``x`` are
    sampled with replacement when there are fewer of them than ``k``."""
    n = x.shape[0]
    start = torch.randperm(n)[:k] if n >= k else torch.randint(0, n, (k,))
    centers = x[start].clone()
    if n < k:  # spread duplicates a little so they can separate
        centers += 1e-3 * torch.randn_like(centers)
    for _ in range(iters):
        index, _ = nearest_code(x, centers)
        sums = torch.zeros_like(centers).index_add_(0, index, x)
        sizes = torch.bincount(index, minlength=k).to(x.dtype)
        moved = sizes > 0
        centers[moved] = sums[moved] / sizes[moved, None]
        if normalize:
            centers = F.normalize(centers, dim=-1)
    return centers


class VectorQuantizer(Quantizer):
    def __init__(self, codebook_size: int = 1024, dim: int = 12, normalize: bool = True,
                 beta: float = 0.25, ema: bool = True, decay: float = 0.99,
                 kmeans_init: bool = True, dead_code_threshold: float = 0.03):
        super().__init__()
        self.codebook_size, self.dim, self.normalize = int(codebook_size), int(dim), normalize
        self.beta, self.ema, self.decay = beta, ema, decay
        self.dead_code_threshold = dead_code_threshold
        init = torch.randn(self.codebook_size, self.dim)
        if normalize:
            init = F.normalize(init, dim=-1)
        if ema:
            self.register_buffer("codebook", init)
            self.register_buffer("ema_sum", init.clone())
        else:
            self.codebook = torch.nn.Parameter(init)
        self.register_buffer("ema_size", torch.ones(self.codebook_size))
        self.register_buffer("initialised", torch.tensor(not kmeans_init))

    def codes(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=-1) if self.normalize else self.codebook

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids[..., 0]
        out = F.embedding(ids.clamp(min=0), self.codes())
        return out * (ids >= 0).unsqueeze(-1).to(out.dtype)

    def relax(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, dim=-1) if self.normalize else z

    def forward(self, z: torch.Tensor) -> Quantized:
        shape = z.shape
        flat = z.reshape(-1, self.dim)
        if self.normalize:
            flat = F.normalize(flat, dim=-1)
        if self.training and not bool(self.initialised):
            self._kmeans_init(flat.detach())
        codes = self.codes()
        index, _ = nearest_code(flat, codes)
        quant = F.embedding(index, codes)
        commit = F.mse_loss(flat, quant.detach())
        loss = self.beta * commit
        if self.training:
            if self.ema:
                self._ema_update(flat.detach(), index)
            else:
                loss = loss + F.mse_loss(quant, flat.detach())
        # straight-through: the decoder sees the code, the encoder gets the decoder's gradient
        values = flat + (quant - flat).detach()
        ids = index.view(*shape[:-1], 1)
        self.count_usage(ids)
        return Quantized(values.view(shape), ids, loss, {"commit": commit.detach()})

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        centers = kmeans(flat.float(), self.codebook_size, normalize=self.normalize)
        self.codebook.data.copy_(centers)
        if self.ema:
            self.ema_sum.copy_(centers)
        self.ema_size.fill_(1.0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, index: torch.Tensor) -> None:
        onehot_sizes = torch.bincount(index, minlength=self.codebook_size).to(flat.dtype)
        sums = torch.zeros_like(self.ema_sum).index_add_(0, index, flat)
        self.ema_size.mul_(self.decay).add_(onehot_sizes, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.ema_size.sum()
        smoothed = (self.ema_size + 1e-5) / (n + self.codebook_size * 1e-5) * n  # Laplace
        new = self.ema_sum / smoothed[:, None]
        self.codebook.copy_(F.normalize(new, dim=-1) if self.normalize else new)
        self._restart_dead(flat)

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor) -> None:
        """Codes used less than ``dead_code_threshold`` times per step (running average) jump to
        random encoder outputs of this batch, so that every code earns its bits."""
        dead = self.ema_size < self.dead_code_threshold
        n_dead = int(dead.sum())
        if n_dead == 0 or flat.shape[0] == 0:
            return
        pick = flat[torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)]
        pick = pick + 1e-3 * torch.randn_like(pick)
        if self.normalize:
            pick = F.normalize(pick, dim=-1)
        self.codebook[dead] = pick
        if self.ema:
            self.ema_sum[dead] = pick
        self.ema_size[dead] = 1.0
