"""Rate-aware (rate-distortion optimised) choice of token ids at encode time, under the token
prior that codes them.

Rounding each FSQ latent to its nearest lattice point is the least distortion, not the fewest
bits. Video coders face the same trade-off for their transform coefficients and settle it at the
encoder (rate-distortion optimised quantisation, "trellis quantisation" in H.264/HEVC): a level
one step away from the nearest may cost far fewer bits for little more error. Here, position by
position (the prior is autoregressive, so the cost of an id depends on the ids chosen before
it), each token takes, among the lattice points within one level of its latent in every
dimension, the one minimising

    (latent - point)^T G_i (latent - point) + rate_lambda * (-log2 p_prior(id | ids chosen so far))

in the decoder's units (FSQ values in [-1, 1]), with p the very probabilities the range coder then
uses (prior.coding_probabilities). G_i is the tokenizer's token_metric: how much a change of
token i moves what the decoder reads. For the linear mixer of the shipped default that is exact
up to the pixel decoder, and it matters: the first tokens draw patterns 30 times larger than the
last, and with plain latent distance (G_i = identity, the fallback) the same bits cost more SSIM
(measured: README, tokenize-image). The choice is
greedy, left to right; it needs no decoder change: the file holds ordinary ids, coded as before.
Because token i's choice depends only on tokens before it, the ids chosen for n tokens are the
first n of those chosen for more: every prefix of a variable-length sequence is the rate-aware
encoding at that length. rate_lambda = 0 is plain rounding (today's ids).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from tokctl.errors import UserError


def check_rate_lambda(value, where: str = "rate_lambda") -> float:
    """A finite lambda >= 0, else one line."""
    try:
        lam = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}={value}: give a number >= 0 (0 = nearest codes)") from None
    if not math.isfinite(lam) or lam < 0:
        raise UserError(f"{where}={value}: give a number >= 0 (0 = nearest codes; larger trades "
                        f"distortion for fewer coded bits)")
    return lam


def check_rate_aware(model, prior, rate_lambda: float, where: str = "rate_lambda",
                     digits_ok: bool = False) -> None:
    """Rate-aware encoding needs an FSQ tokenizer (one id per latent) and a prior to weigh bits
    (the greedy choice here, a prior over ids; refinement's rate term, ``digits_ok``, also a
    DigitPrior)."""
    if rate_lambda <= 0:
        return
    if prior is None:
        raise UserError(f"{where}={rate_lambda:g}: rate-aware encoding weighs the bits of a token "
                        f"prior; this tokenizer has none here (give one, or leave it at 0)")
    if not digits_ok and getattr(prior.model, "kind", None) == "digits":
        raise UserError(f"{where}={rate_lambda:g}: this tokenizer's prior codes FSQ digits, not "
                        f"ids, and the greedy choice weighs ids; weigh bits while refining "
                        f"instead (encode --refine N --refine-rate R)")
    if not hasattr(model.quantizer, "bounded") or model.quantizer.depth != 1:
        raise UserError(f"{where}={rate_lambda:g}: rate-aware encoding needs an FSQ tokenizer "
                        f"(this one quantises with {type(model.quantizer).__name__})")


def candidates(quantizer, latents: torch.Tensor, metric: torch.Tensor | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """The lattice points within one level of each latent in every dimension: ids (B, L, K) and
    squared distances (B, L, K) float64 in the decoder's units (FSQ values in [-1, 1]), weighted
    by ``metric`` (L, D, D) when given (the tokenizer's token_metric). Candidate 0 is the nearest
    point (plain rounding); a step past the lattice's edge is clipped (a duplicate of another
    candidate, harmless)."""
    levels = quantizer.levels.long()
    half = (levels // 2).double()
    b = quantizer.bounded(latents.detach()).double()          # (B, L, D), level units
    nearest = quantizer.nearest_digits(latents)               # digits 0 .. levels-1
    deltas = torch.tensor(sorted(itertools.product((-1, 0, 1), repeat=quantizer.dim),
                                 key=lambda d: (any(d), d)))  # (K, D), all zeros first
    digits = torch.minimum(torch.clamp(nearest[..., None, :] + deltas, min=0), levels - 1)
    values = (digits.double() - levels // 2) / half           # what the decoder would see
    diff = (b / half)[..., None, :] - values                  # (B, L, K, D)
    if metric is None:
        dist = diff.pow(2).sum(-1)
    else:  # d^T G_i d: the change of what the decoder reads (token_metric)
        dist = torch.einsum("blkd,lde,blke->blk", diff, metric[:diff.shape[1]], diff)
    return quantizer.ids_of(digits).numpy(), dist.numpy()


@torch.no_grad()
def choose_ids(model, prior, latents: torch.Tensor, n: int, rate_lambda: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """The encoder's (B, L, dim) latents of B tiles -> their nearest ids (B, n), and the ids
    chosen greedily for distortion + rate_lambda * bits under ``prior`` (a TokenPrior; the
    nearest themselves when rate_lambda = 0)."""
    ids, dist = candidates(model.quantizer, latents[:, :n], model.token_metric())
    if rate_lambda == 0:
        return ids[:, :, 0], ids[:, :, 0]
    rows = np.arange(ids.shape[0])[:, None]
    chosen = np.zeros(ids.shape[:2], dtype=np.int64)

    def step(i: int, probs: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):
            bits = -np.log2(probs[rows, ids[:, i]])            # (B, K)
        # argmin keeps the first of equal costs: the nearest point wins a tie
        pick = np.argmin(dist[:, i] + rate_lambda * bits, axis=1)
        chosen[:, i] = ids[rows[:, 0], i, pick]
        return chosen[:, i]

    step.batch = ids.shape[0]
    prior.coding_probabilities(None, n, decode_step=step)
    return ids[:, :, 0], chosen
