"""A 2D grid tokenizer (VQGAN-like) of the same size as the 1D ones: the baseline they claim to beat.

Same stem, transformer and pixel decoder as :class:`TiTok`, but no latent tokens: each cell of the
(image_size / patch_size)^2 grid is quantised and becomes one token, in raster order. A 64x64
image with patch 8 gives 64 tokens, the same count and bytes as TiTok with 64 latents.
Fixed length: a missing cell is decoded as a learned mask token (shown only for completeness).
"""

from __future__ import annotations

import torch
from torch import nn

from tokctl.imagetok.layers import Transformer, image_stem
from tokctl.imagetok.models.base import ImageTokenizer
from tokctl.imagetok.quantizers import Quantizer


class VQ2D(ImageTokenizer):
    name = "vq2d"

    def __init__(self, quantizer: Quantizer, image_size: int = 64, patch_size: int = 8,
                 width: int = 192, heads: int = 4, encoder_layers: int = 4, decoder_layers: int = 4,
                 stem: str = "conv", conv_channels: tuple[int, ...] = (32, 64, 128)):
        grid = image_size // patch_size
        super().__init__(image_size, quantizer, grid * grid)
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.grid = grid
        self.stem, self.pixels = image_stem(stem, patch_size, conv_channels, width)
        scale = width ** -0.5
        self.pos = nn.Parameter(scale * torch.randn(1, grid * grid, width))
        self.encoder = Transformer(width, encoder_layers, heads)
        self.to_code = nn.Linear(width, quantizer.dim)
        self.from_code = nn.Linear(quantizer.dim, width)
        self.mask_token = nn.Parameter(scale * torch.randn(1, 1, width))
        self.decoder_pos = nn.Parameter(scale * torch.randn(1, grid * grid, width))
        self.decoder = Transformer(width, decoder_layers, heads)

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images * 2 - 1).flatten(2).transpose(1, 2) + self.pos
        return self.to_code(self.encoder(x))

    def decode_latents(self, latents: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b = latents.shape[0]
        present = torch.arange(self.num_latents, device=latents.device)[None, :] < keep[:, None]
        x = torch.where(present[..., None], self.from_code(latents), self.mask_token)
        x = self.decoder(x + self.decoder_pos)
        feats = x.transpose(1, 2).reshape(b, -1, self.grid, self.grid)
        return (self.pixels(feats) + 1) / 2
