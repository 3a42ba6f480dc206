"""What every quantiser shares: the output record and codebook-usage bookkeeping."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Quantized:
    """``values``: quantised vectors (straight-through gradient to the input), ``ids``: (B, L, depth)
    code indices, ``loss``: the quantiser's own training loss (0 where it has none)."""

    values: torch.Tensor
    ids: torch.Tensor
    loss: torch.Tensor
    stats: dict = field(default_factory=dict)


class Quantizer(nn.Module):
    """Maps (B, L, dim) vectors to codes. ``depth`` ids per vector, each in [0, codebook_size)."""

    dim: int
    codebook_size: int
    depth: int = 1

    def __init__(self) -> None:
        super().__init__()
        self._counts: torch.Tensor | None = None

    @property
    def bits_per_id(self) -> int:
        return max(1, math.ceil(math.log2(self.codebook_size)))

    def relax(self, z: torch.Tensor) -> torch.Tensor:
        """The continuous stand-in used during the autoencoder warm-up (no rounding, no codes)."""
        return z

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L, depth) ids -> (B, L, dim) vectors. An id of -1 (a residual stage that was not
        kept) contributes nothing."""
        raise NotImplementedError

    # --- usage: counted over every forward pass since the last reset ----------------------------
    def reset_usage(self) -> None:
        self._counts = None

    def count_usage(self, ids: torch.Tensor) -> None:
        flat = ids.reshape(-1)
        flat = flat[flat >= 0].cpu()
        counts = torch.bincount(flat, minlength=self.codebook_size).double()
        self._counts = counts if self._counts is None else self._counts + counts

    def usage(self) -> dict:
        """Fraction of codes used, and the entropy of their frequencies (bits; log2 of the
        codebook size would be a perfectly even use)."""
        if self._counts is None or self._counts.sum() == 0:
            return {"codes_used": 0, "usage": 0.0, "entropy_bits": 0.0,
                    "max_entropy_bits": math.log2(self.codebook_size)}
        p = self._counts / self._counts.sum()
        nz = p[p > 0]
        return {"codes_used": int((self._counts > 0).sum()),
                "usage": float((self._counts > 0).double().mean()),
                "entropy_bits": float(-(nz * nz.log2()).sum()),
                "perplexity": float(2 ** (-(nz * nz.log2()).sum())),
                "max_entropy_bits": math.log2(self.codebook_size)}
