"""Finite scalar quantisation (Mentzer et al., 2023): each of a few dimensions is bounded and
rounded to one of ``levels[i]`` values; the code id is the mixed-radix number of the rounded values.
No codebook to learn, so no collapse: every id is reachable by construction."""

from __future__ import annotations

import math

import torch

from tokctl.imagetok.quantizers.base import Quantized, Quantizer


class FSQ(Quantizer):
    def __init__(self, levels: tuple[int, ...] = (8, 8, 8, 8)):
        super().__init__()
        levels = [int(v) for v in levels]
        if not levels or min(levels) < 2:
            raise ValueError(f"FSQ levels must be integers >= 2, got {levels}")
        self.levels_list = levels
        self.dim = len(levels)
        self.codebook_size = int(math.prod(levels))
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32), persistent=False)
        basis = [math.prod(levels[:i]) for i in range(len(levels))]
        self.register_buffer("basis", torch.tensor(basis, dtype=torch.int64), persistent=False)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        # An even number of levels has no zero level: shift by half a step so the rounded
        # values are the integers -L/2 .. L/2-1. The bound is a hair wider than (L-1)/2 (as in
        # the paper's code): narrower, two levels would need atanh(>1) for their shift.
        half = (self.levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def bounded(self, z: torch.Tensor) -> torch.Tensor:
        """The continuous value of each dimension in level units, before rounding (float32):
        rounding it gives the code; rate-aware encoding (rdo.py) also weighs its neighbours."""
        return self._bound(z.float())

    def nearest_digits(self, z: torch.Tensor) -> torch.Tensor:
        """Each dimension's nearest level as a digit 0 .. levels-1 (long), from the latents."""
        return self._bound(z.detach().float()).round().long() + self.levels.long() // 2

    def ids_of(self, digits: torch.Tensor) -> torch.Tensor:
        """Digits (..., dim) -> the code ids (...): the mixed-radix number they spell."""
        return (digits * self.basis).sum(-1)

    def digits_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Code ids (...) -> their digits (..., dim): the inverse of :meth:`ids_of`."""
        return (ids.unsqueeze(-1) // self.basis) % self.levels.long()

    def values_of(self, digits: torch.Tensor) -> torch.Tensor:
        """Digits (..., dim) -> the values the decoder reads, in [-1, 1)."""
        half_width = self.levels // 2
        return (digits.float() - half_width) / half_width

    def relax(self, z: torch.Tensor) -> torch.Tensor:
        return self._bound(z.float()).to(z.dtype) / (self.levels // 2)

    def forward(self, z: torch.Tensor) -> Quantized:
        bounded = self._bound(z.float())
        rounded = bounded + (bounded.round() - bounded).detach()
        half_width = (self.levels // 2)
        values = rounded / half_width
        ids = self.ids_of((rounded.detach().round() + half_width).long())[..., None]
        self.count_usage(ids)
        return Quantized(values.to(z.dtype), ids, z.new_zeros(()), {})

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids[..., 0]
        out = self.values_of(self.digits_of(ids.clamp(min=0)))
        return out * (ids >= 0).unsqueeze(-1).float()
