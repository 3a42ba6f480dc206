"""Turning logits into the distribution a method samples from, the same way for every method.

Greedy is temperature 0. Otherwise temperature, then top-k, then top-p (nucleus), in the order
Hugging Face's logits processors apply them, so that `method=ar` and `method=hf` sample from the
same distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Settings:
    """What every method is asked to do for one generation."""

    max_new_tokens: int
    sampling: Sampling
    eos_ids: frozenset[int] = field(default_factory=frozenset)


def probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Sampling distribution over the vocabulary for each row of ``logits`` ([..., V]), in fp32."""
    logits = logits.float()
    if s.greedy:
        out = torch.zeros_like(logits)
        out.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        return out
    if s.temperature != 1.0:  # dividing by 1 changes nothing and costs a call a token
        logits = logits / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cum <= (1 - s.top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits.softmax(-1)


def sample(p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index drawn from each row of ``p`` ([..., V], non-negative, any positive sum): the
    indices ([...]). Inverse CDF with one uniform a row, in float64: the first index whose
    cumulative mass exceeds u times the total. The same law as ``torch.multinomial(p, 1)``, in
    about 60% of its time on one row and a third on a few rows (multinomial draws an
    exponential per entry): on the image prior a draw is a fifth of an `ar` step. Zero-mass
    entries are never drawn (their cumulative mass equals the one before); float64 keeps the
    smallest masses of a large vocabulary."""
    cum = p.double().cumsum(-1)
    u = torch.rand(cum.shape[:-1] + (1,), dtype=torch.float64, generator=generator,
                   device=p.device)
    index = torch.searchsorted(cum, u * cum[..., -1:], right=True).squeeze(-1)
    return index.clamp_max(cum.shape[-1] - 1)  # u * total rounded up to the total


def choose(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """One token from the logits of one position."""
    if s.greedy:
        return int(logits.argmax())
    return int(sample(probs(logits, s), generator))
