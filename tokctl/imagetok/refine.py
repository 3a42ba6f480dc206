"""Encode-time refinement of a tokenizer's latents (semi-amortised inference).

A tokenizer's encoder is amortised: one forward pass guesses the latents for any image, and on
photos unlike its training crops (fur, foliage, fabric) that guess is far from the best the
decoder can draw. Learned image codecs close this "amortisation gap" at the encoder, per image,
by gradient descent on the latents through the fixed decoder (Campos et al. 2019, "Content
adaptive optimization for neural image compression"; Yang, Bamler and Mandt 2020, "Improving
inference for neural image compression"). Here the latents start from the encoder's guess and
take ``steps`` Adam steps on the tokenizer's own training loss, L1 + (1 - SSIM), of the decoded
image of their *quantised* values (rounding passes the gradient straight through, as in
training), with a cosine-decayed step size; each image keeps the iterate whose quantised decode
scored best, so refinement never returns worse codes than the encoder's by that loss.

Nothing changes for the decoder: the file holds ordinary ids. Only the first ``keep`` latents
are refined, for the decoder that sees exactly them, so a file of n tokens is refined for n
tokens (its own prefixes still decode). Deterministic on one machine and thread count.
"""

from __future__ import annotations

import math

import torch
from pytorch_msssim import ssim

from tokctl.errors import UserError

#: Adam's first step size on the latents (pre-bound FSQ units), decayed to 0 by a cosine.
#: Chosen on texture-weighted crops of the training photos (README, tokenize-image).
LR = 0.1


def check_refine_steps(value, where: str = "refine_steps") -> int:
    """An integer >= 0, else one line."""
    try:
        steps = int(value)
        ok = float(value) == steps
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok or steps < 0:
        raise UserError(f"{where}={value}: give a whole number of steps >= 0 (0 = the encoder's "
                        f"latents as they are; 100 is a good start)")
    return steps


def check_refine_rate(model, prior, steps: int, rate, where: str = "refine_rate") -> float:
    """A rate weight >= 0 that can apply: it needs refinement steps, an FSQ tokenizer and its
    prior; else one line."""
    from tokctl.imagetok import rdo

    rate = rdo.check_rate_lambda(rate, where)
    if rate > 0 and steps <= 0:
        raise UserError(f"{where}={rate:g} weighs coded bits while refining: give refinement "
                        f"steps too (encode --refine N, eval refine_steps=N)")
    rdo.check_rate_aware(model, prior, rate, where, digits_ok=True)
    return rate


def objective(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per image: L1 + (1 - SSIM), the tokenizers' training loss at its default weights."""
    l1 = (recon - images).abs().flatten(1).mean(1)
    return l1 + 1 - ssim(recon.clamp(0, 1), images, data_range=1.0, size_average=False)


def coded_bits(quantizer, prior, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the bits the prior would code the latents' nearest ids in (B,), exact for the
    ids (teacher-forced, float32), and a surrogate of it (B,) that is continuous in the latents,
    for their gradient: each latent's bits interpolated multilinearly between the 2^dim lattice
    points around it (equal to the exact bits on a lattice point), given the earlier ids as
    they are."""
    if getattr(prior, "kind", None) == "digits":
        return _digit_bits(quantizer, prior, latents)
    b = quantizer.bounded(latents)                                  # (B, n, D), level units
    half = quantizer.levels // 2
    levels = quantizer.levels.long()
    ids = quantizer.ids_of(quantizer.nearest_digits(latents))      # (B, n): the nearest
    with torch.no_grad():
        table = -torch.log_softmax(prior(ids).float(), -1) / math.log(2)   # (B, n, vocab)
    exact = table.gather(-1, ids[..., None])[..., 0].sum(1)
    low = b.detach().floor()
    frac = b - low                                                   # (B, n, D) in [0, 1)
    corners = torch.cartesian_prod(*[torch.tensor([0, 1])] * quantizer.dim).view(-1,
                                                                                 quantizer.dim)
    digits = (low.long() + half.long())[..., None, :] + corners      # (B, n, 2^D, D)
    digits = torch.minimum(digits.clamp(min=0), levels - 1)          # an edge: its own point
    corner_ids = quantizer.ids_of(digits)                            # (B, n, 2^D)
    weights = torch.where(corners.bool(), frac[..., None, :], 1 - frac[..., None, :]).prod(-1)
    surrogate = (weights * table.gather(-1, corner_ids)).sum(-1)
    return exact, surrogate.sum(1)


def _digit_bits(quantizer, prior, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`coded_bits` under a DigitPrior, which codes each FSQ digit in turn: the exact bits
    of the nearest digits, and each digit's bits interpolated linearly between the two levels
    around it (the context as the nearest digits give it)."""
    b = quantizer.bounded(latents)                                  # (B, n, D), level units
    digits = quantizer.nearest_digits(latents)
    with torch.no_grad():
        table = prior.bits(digits)                                  # (B, n, D, levels)
    exact = table.gather(-1, digits[..., None])[..., 0].sum((1, 2))
    top = quantizer.levels.long() - 1
    low = b.detach().floor()
    frac = b - low
    below = torch.minimum((low.long() + quantizer.levels.long() // 2).clamp(min=0), top)
    above = torch.minimum(below + 1, top)                            # an edge: its own level
    surrogate = ((1 - frac) * table.gather(-1, below[..., None])[..., 0]
                 + frac * table.gather(-1, above[..., None])[..., 0])
    return exact, surrogate.sum((1, 2))


def refine_latents(model, images: torch.Tensor, latents: torch.Tensor, keep: int, steps: int,
                   lr: float = LR, prior=None, rate: float = 0.0) -> torch.Tensor:
    """(B, 3, S, S) images and their encoder latents (B, L, dim) -> latents refined for the
    decoder that keeps the first ``keep`` of them (the rest are returned as given). With a token
    ``prior`` (a TokenPrior over this FSQ tokenizer's ids, or a DigitPrior over its digits) and
    ``rate`` > 0 the objective is distortion + rate x the prior's coded bits a token
    (:func:`coded_bits`)."""
    if steps <= 0:
        return latents
    quantizer = model.quantizer
    keep_t = torch.full((images.shape[0],), keep, dtype=torch.long, device=images.device)
    z = latents.detach().clone().requires_grad_(True)
    best = z.detach().clone()
    best_loss = torch.full((images.shape[0],), float("inf"), device=images.device)
    opt = torch.optim.Adam([z], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    # usage is counted for the codes kept, not for every trial (and filling a table of 2^24
    # codes at every step would cost more than the step)
    quantizer.counting = False
    try:
        with torch.enable_grad():
            for i in range(steps + 1):
                # the forward of the quantised point: its loss is exactly what the file would give
                loss = objective(model.decode_latents(quantizer(z).values, keep_t), images)
                exact = loss.detach()
                if rate > 0:
                    bits, surrogate = coded_bits(quantizer, prior, z[:, :keep])
                    exact = exact + rate * bits / keep
                    loss = loss + rate * surrogate / keep
                better = exact < best_loss
                best_loss = torch.where(better, exact, best_loss)
                best[better] = z.detach()[better]
                if i == steps:
                    break
                (z.grad,) = torch.autograd.grad(loss.sum(), z)  # the model's own grads untouched
                opt.step()
                schedule.step()
    finally:
        quantizer.counting = True
    return torch.cat([best[:, :keep], latents[:, keep:]], dim=1)
