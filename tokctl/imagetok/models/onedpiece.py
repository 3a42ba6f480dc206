"""One-D-Piece (Miwa et al., 2025): TiTok trained with Tail Token Drop.

At each training step every image keeps only the first ``K - k`` of its K latent tokens, k drawn
uniformly from [0, K-1]; the decoder sees only the kept prefix. The earliest tokens are then
needed by every prefix, so they come to carry the most information: any prefix decodes, and
quality rises with each token kept. The same model serves every token budget.
"""

from __future__ import annotations

import torch

from tokctl.imagetok.models.titok import TiTok


class OneDPiece(TiTok):
    name = "onedpiece"
    variable_length = True

    def __init__(self, *args, min_keep: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.min_keep = int(min_keep)

    def training_keep(self, batch: int, device) -> torch.Tensor:
        return torch.randint(self.min_keep, self.num_latents + 1, (batch,), device=device)
