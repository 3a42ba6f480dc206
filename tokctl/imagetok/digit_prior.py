"""A prior over the FSQ digits of a 2D grid tokenizer, for tokenizers whose ids are too many for
a softmax over them (vq2d32: 16^8 = 2^32 ids a cell).

Each cell of the grid holds one FSQ id, a mixed-radix number of ``dim`` digits (one rounded
level per FSQ dimension). The ids are coded digit by digit, cells in raster order and the
digits of a cell in turn, each with a categorical distribution from a small MLP over its causal
context: all digits of the cell's four earlier neighbours (left, top-left, top, top-right) and
the cell's own earlier digits. This is the context modelling of lossless image coders (the
causal template of CALIC and JPEG-LS) with a learned predictor in place of a fixed one, and of
the channel-conditional context models of learned codecs (Minnen and Singh 2020), at a size
that trains in minutes on a CPU.

It is a drop-in prior for the coder in prior.py: ``symbols`` turns ids into the coded digits,
``coding_probabilities`` gives their probabilities in coding order (one row of the MLP at a
time, in float64, logits rounded to the grid: encoder and decoder run the same loop, so they
compute the same probabilities bit for bit), and ``ids_of_symbols`` turns decoded digits back.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from tokctl.imagetok.coding_precision import coding_softmax, coding_start
from tokctl.imagetok.quantizers.fsq import FSQ

#: The causal neighbours of a cell in raster order: (row offset, column offset).
NEIGHBOURS = ((0, -1), (-1, -1), (-1, 0), (-1, 1))


class DigitPrior(nn.Module):
    """Per digit of each cell of a ``grid`` x ``grid`` FSQ code map: logits over its levels."""

    kind = "digits"

    def __init__(self, levels: list[int], grid: int, hidden: int = 96, name: str = "digits"):
        super().__init__()
        self.levels_list = [int(v) for v in levels]
        self.dim, self.grid = len(self.levels_list), int(grid)
        self.max_tokens = self.grid * self.grid
        self.conditions = 0  # no cluster-conditional variant
        self.vocab = max(self.levels_list)  # symbols per coded position
        self.fsq = FSQ(self.levels_list)  # its digits <-> ids <-> values (no weights)
        levels_t = torch.tensor(self.levels_list)
        # a digit beyond its dimension's levels cannot occur: no probability for it
        self.register_buffer("impossible", torch.arange(self.vocab)[None, :] >= levels_t[:, None],
                             persistent=False)
        d = self.dim
        features = len(NEIGHBOURS) * (d + 1) + d + d  # neighbours (+ present), own, which digit
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, self.vocab))

    # ------------------------------------------------------------------------ ids and digits
    def digits_of(self, ids: torch.Tensor) -> torch.Tensor:
        """(..., n) ids -> (..., n, dim) digits."""
        return self.fsq.digits_of(ids)

    def symbols(self, tiles: np.ndarray) -> np.ndarray:
        """(T, n) ids -> (T, n * dim) digits in coding order."""
        digits = self.digits_of(torch.as_tensor(np.asarray(tiles, dtype=np.int64)))
        return digits.reshape(len(tiles), -1).numpy()

    def ids_of_symbols(self, symbols: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`symbols`."""
        return self.fsq.ids_of(torch.as_tensor(symbols).view(len(symbols), -1, self.dim)).numpy()

    # ------------------------------------------------------------------------------ the model
    def context(self, digits: torch.Tensor) -> torch.Tensor:
        """(B, n, dim) digits -> (B, n, 4 (dim + 1)): each cell's four earlier neighbours' values
        and whether each is there (at the grid's edge one reads 0, flagged 0)."""
        b, n, d = digits.shape
        g = self.grid
        full = digits.new_zeros(b, g * g, d, dtype=torch.float32)
        full[:, :n] = self.fsq.values_of(digits)
        padded = nn.functional.pad(full.view(b, g, g, d), (0, 0, 1, 1, 1, 0))  # a row above,
        row, col = torch.arange(g)[:, None], torch.arange(g)[None, :]          # a column each side
        parts = []
        for dr, dc in NEIGHBOURS:
            shifted = padded[:, 1 + dr:1 + dr + g, 1 + dc:1 + dc + g]
            present = ((row + dr >= 0) & (col + dc >= 0) & (col + dc < g)).float()
            parts += [shifted * present[..., None], present[None, ..., None].expand(b, g, g, 1)]
        return torch.cat(parts, -1).view(b, g * g, -1)[:, :n]

    def own(self, digits: torch.Tensor) -> torch.Tensor:
        """(..., dim) digits of cells -> (..., dim, 2 dim): for each digit k, the cell's digits
        before k (later ones read 0) and which digit it is."""
        d = self.dim
        earlier = torch.tril(torch.ones(d, d), -1)                   # digit k sees digits < k
        before = self.fsq.values_of(digits)[..., None, :] * earlier
        return torch.cat([before, torch.eye(d).expand_as(before)], -1)

    def features(self, digits: torch.Tensor) -> torch.Tensor:
        """(B, n, dim) digits -> (B, n, dim, features): each digit's causal context."""
        context = self.context(digits)
        own = self.own(digits)
        return torch.cat([context[:, :, None, :].expand(*own.shape[:3], context.shape[-1]), own],
                         -1)

    def forward(self, digits: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, n, dim, vocab) of every digit given its context (a digit
        beyond its dimension's levels at -inf)."""
        return self.net(self.features(digits)).masked_fill(self.impossible, float("-inf"))

    def loss_bits(self, tokens: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n) ids -> (n,) mean bits a cell (all its digits) at each position, as
        TokenPrior.loss_bits (``start`` is for its cluster-conditional priors; none here)."""
        digits = self.digits_of(tokens)
        logp = torch.log_softmax(self(digits), -1).gather(-1, digits[..., None])[..., 0]
        return -logp.sum(-1).mean(0) / math.log(2)

    def bits(self, digits: torch.Tensor) -> torch.Tensor:
        """-log2 p of each digit given its context: (B, n, dim, vocab), every possible value
        of each digit (the context as given)."""
        return -torch.log_softmax(self(digits).float(), -1) / math.log(2)

    # ------------------------------------------------------------------------------- coding
    def coding_probabilities(self, tokens: np.ndarray | None, n: int,
                             decode_step=None) -> np.ndarray:
        """The probabilities the coder uses, (T, n * dim, vocab) float64 in coding order, one
        digit at a time as the decoder must: ``tokens`` (T, n) ids when encoding; when decoding,
        ``decode_step(j, probs (T, vocab)) -> digits (T,)`` gives coded position j's digits."""
        model, t = coding_start(self, tokens, n, decode_step)
        digits = (self.digits_of(torch.as_tensor(np.asarray(tokens, dtype=np.int64)))
                  if tokens is not None else torch.zeros(t, n, self.dim, dtype=torch.long))
        out = np.zeros((t, n * self.dim, self.vocab), dtype=np.float64)
        with torch.no_grad():
            for i in range(n):
                # cell i's neighbours are all coded before it; its own digits, one at a time
                context = model.context(digits[:, :i + 1])[:, i].double()
                for k in range(self.dim):
                    row = torch.cat([context, model.own(digits[:, i])[:, k].double()], -1)
                    logits = model.net(row).masked_fill(model.impossible[k], float("-inf"))
                    probs = coding_softmax(logits)
                    out[:, i * self.dim + k] = probs
                    if decode_step is not None:
                        digits[:, i, k] = torch.as_tensor(
                            np.asarray(decode_step(i * self.dim + k, probs), dtype=np.int64))
        return out
