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


#: Codebooks larger than this count their usage sparsely (the ids seen and their counts): a
#: dense table of 2^24 counts costs about 0.3 s to fill at every forward.
DENSE_COUNTS = 1 << 20


class Quantizer(nn.Module):
    """Maps (B, L, dim) vectors to codes. ``depth`` ids per vector, each in [0, codebook_size)."""

    dim: int
    codebook_size: int
    depth: int = 1

    def __init__(self) -> None:
        super().__init__()
        self._counts: torch.Tensor | None = None
        self.counting = True  # off while refinement tries codes (refine.py): only kept ones count

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
        if not self.counting:
            return
        flat = ids.reshape(-1)
        flat = flat[flat >= 0].cpu()
        if self.codebook_size > DENSE_COUNTS:  # the used ones only
            seen = flat if self._counts is None else torch.cat([self._counts[0], flat])
            weight = torch.ones(len(flat), dtype=torch.float64)
            if self._counts is not None:
                weight = torch.cat([self._counts[1], weight])
            used, where = torch.unique(seen, return_inverse=True)
            self._counts = (used, torch.zeros(len(used), dtype=torch.float64).index_add_(
                0, where, weight))
            return
        counts = torch.bincount(flat, minlength=self.codebook_size).double()
        self._counts = counts if self._counts is None else self._counts + counts

    def usage(self) -> dict:
        """Fraction of codes used, and the entropy of their frequencies (bits; log2 of the
        codebook size would be a perfectly even use)."""
        counts = self._counts[1] if isinstance(self._counts, tuple) else self._counts
        if counts is None or counts.sum() == 0:
            return {"codes_used": 0, "usage": 0.0, "entropy_bits": 0.0,
                    "max_entropy_bits": math.log2(self.codebook_size)}
        p = counts / counts.sum()
        nz = p[p > 0]
        return {"codes_used": int((counts > 0).sum()),
                "usage": int((counts > 0).sum()) / self.codebook_size,
                "entropy_bits": float(-(nz * nz.log2()).sum()),
                "perplexity": float(2 ** (-(nz * nz.log2()).sum())),
                "max_entropy_bits": math.log2(self.codebook_size)}
