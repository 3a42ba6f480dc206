"""FlexTok-style nested dropout (Bachmann et al., 2025), with a plain (not rectified-flow) decoder.

Differences from One-D-Piece's tail drop, as in FlexTok:
- the encoder's register (latent) tokens attend causally among themselves: register i sees the
  patches and registers 0..i, never a later one, so a prefix is a self-contained description;
- the number kept is drawn from the powers of two 1, 2, 4, ..., K (uniformly over that set);
- dropped registers are not removed but replaced by one learned mask token, which the decoder
  sees in their place.

With ``mixer="linear"`` there is no attention to restrict: each token is its own linear read of
the grid, so a prefix is self-contained by construction, and the decoder's map gives every
dropped token a learned "absent" input (the weights of its present flag) in place of the mask
token. What then tells the two methods apart is which prefix lengths training draws.
"""

from __future__ import annotations

import torch
from torch import nn

from tokctl.imagetok.models.titok import TiTok


class FlexNested(TiTok):
    name = "flexnested"
    variable_length = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.mixer == "attention":
            width = self.latent_pos.shape[-1]
            self.dropped_token = nn.Parameter(width ** -0.5 * torch.randn(1, 1, width))
        keeps, k = [], 1
        while k < self.num_latents:
            keeps.append(k)
            k *= 2
        keeps.append(self.num_latents)
        self.register_buffer("keep_choices", torch.tensor(keeps), persistent=False)

    def encoder_mask(self, device) -> torch.Tensor:
        n_patches, k = self.grid * self.grid, self.num_latents
        s = n_patches + k
        allowed = torch.ones(s, s, dtype=torch.bool, device=device)
        allowed[:n_patches, n_patches:] = False  # patches do not read the registers
        allowed[n_patches:, n_patches:] = torch.tril(torch.ones(k, k, dtype=torch.bool, device=device))
        return allowed

    def training_keep(self, batch: int, device) -> torch.Tensor:
        pick = torch.randint(0, len(self.keep_choices), (batch,), device=device)
        return self.keep_choices.to(device)[pick]

    def latent_inputs(self, latents: torch.Tensor, keep: torch.Tensor):
        kept = torch.arange(self.num_latents, device=latents.device)[None, :] < keep[:, None]
        x = torch.where(kept[..., None], self.from_code(latents), self.dropped_token)
        x = x + self.latent_pos
        return x, torch.ones_like(kept)
