"""TiTok (Yu et al., 2024, "An Image is Worth 32 Tokens"): a 1D tokenizer.

The encoder is a ViT over the image patches with K learnable latent tokens appended; only the
latents' outputs are quantised. The decoder is a ViT over a grid of mask tokens plus the
quantised latents; the grid's outputs are turned back into pixels.

``stem="patch"`` is the paper's plain ViT (linear patch embedding, linear pixel head).
``stem="conv"`` (the default here) puts a small convolutional stem and pixel decoder around the
same 1D bottleneck: at CPU training budgets a pure ViT learns little more than each image's mean
colour, while convolutions give it local texture for free.

``shortcut > 0`` adds a low-rank linear path beside attention, in both directions: every latent
token starts from a linear map of the whole (flattened, narrowed to ``shortcut`` channels) patch
grid, and every grid query of the decoder from a linear map of all kept latents. At first the
mask-token decoder carries no image information at all (its queries are identical for every
image and attention is uniform), and on a CPU budget of a few thousand steps it never learns to
route it; the linear path carries the coarse image from the first step, and attention refines.
Latent i still depends on the whole image, and the decoder still sees only the kept prefix.

``proxy`` (a vq2d tokenizer's config; ``tokenizer.proxy=vq2d`` at training) is TiTok's own
two-stage recipe: the stem and pixel decoder are those of a trained 2D tokenizer, and the
decoder also learns to predict that tokenizer's codes (``proxy_loss``); see
:mod:`tokctl.imagetok.proxy`.

``mixer="linear"`` keeps only such a path, at full rank, and drops both transformers: the K
tokens are one learned linear map of the whole flattened feature grid, and the decoder's grid is
one learned linear map of the kept tokens (:class:`GridToTokens`, :class:`TokensToGrid`). Still
1D (every token describes the whole image; none belongs to a grid cell), and far cheaper; but
trained on this CPU its codebook collapsed to 2% of the codes, so the defaults keep attention.
``heads``, the ``*_layers`` and
``shortcut`` do not apply to it; ``width`` is the grid's channel count.
"""

from __future__ import annotations

import torch
from torch import nn

from tokctl.imagetok.layers import GridToTokens, TokensToGrid, Transformer, image_stem
from tokctl.imagetok.models.base import ImageTokenizer
from tokctl.imagetok.proxy import Proxy
from tokctl.imagetok.quantizers import Quantizer


class TiTok(ImageTokenizer):
    name = "titok"

    def __init__(self, quantizer: Quantizer, image_size: int = 64, patch_size: int = 8,
                 num_latents: int = 32, width: int = 192, heads: int = 4, encoder_layers: int = 4,
                 decoder_layers: int = 4, stem: str = "conv",
                 conv_channels: tuple[int, ...] = (32, 64, 128), shortcut: int = 0,
                 mixer: str = "attention", proxy: dict | None = None,
                 proxy_loss: float = 1.0, tune_proxy_decoder: bool = False):
        super().__init__(image_size, quantizer, num_latents)
        if mixer not in ("attention", "linear"):
            raise ValueError(f"mixer must be 'attention' or 'linear', not {mixer!r}")
        self.mixer = mixer
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.grid = image_size // patch_size
        n_patches = self.grid * self.grid
        self.proxy, self.proxy_loss = None, float(proxy_loss)
        if proxy:
            self.proxy = Proxy(proxy, width, tune_proxy_decoder)
            if self.proxy.grid != self.grid:
                raise ValueError(f"the proxy's grid is {self.proxy.grid}x{self.proxy.grid}, this "
                                 f"tokenizer's {self.grid}x{self.grid}: match patch_size")
            self.stem, self.pixels = self.proxy.encode, self.proxy.decode
        else:
            self.stem, self.pixels = image_stem(stem, patch_size, conv_channels, width)
        self.shortcut = 0
        if mixer == "linear":
            self.grid_to_tokens = GridToTokens(width, self.grid, num_latents, quantizer.dim)
            self.tokens_to_grid = TokensToGrid(num_latents, quantizer.dim, width, self.grid)
            return
        scale = width ** -0.5
        self.patch_pos = nn.Parameter(scale * torch.randn(1, n_patches, width))
        self.latent_tokens = nn.Parameter(scale * torch.randn(1, num_latents, width))
        self.encoder = Transformer(width, encoder_layers, heads)
        self.to_code = nn.Linear(width, quantizer.dim)
        self.from_code = nn.Linear(quantizer.dim, width)
        self.latent_pos = nn.Parameter(scale * torch.randn(1, num_latents, width))
        self.mask_token = nn.Parameter(scale * torch.randn(1, 1, width))
        self.decoder_pos = nn.Parameter(scale * torch.randn(1, n_patches, width))
        self.decoder = Transformer(width, decoder_layers, heads)
        self.shortcut = int(shortcut)
        if self.shortcut:
            r = self.shortcut
            self.grid_narrow = nn.Linear(width, r)
            self.grid_to_latents = nn.Linear(n_patches * r, num_latents * r)
            self.latent_widen = nn.Linear(r, width)
            # the decoder's map reads each kept latent's code and a "kept" flag
            self.latents_to_grid = nn.Linear(num_latents * (quantizer.dim + 1), n_patches * r)
            self.grid_widen = nn.Linear(r, width)

    def token_metric(self) -> torch.Tensor | None:
        """With the linear mixer the feature grid is a bias plus one linear pattern per kept
        token (TokensToGrid), so a change d of token i moves the grid by exactly M_i d:
        G_i = M_i^T M_i. The first tokens draw far larger patterns than the last (a 30-fold
        spread in the shipped default), which plain latent distance ignores."""
        if self.mixer != "linear":
            return None
        dim = self.quantizer.dim
        w = self.tokens_to_grid.proj.weight.detach().double()
        m = w.view(w.shape[0], self.num_latents, dim + 1)[..., :dim].transpose(0, 1)  # (L, C, dim)
        g = m.transpose(1, 2) @ m
        return g / (g.diagonal(dim1=1, dim2=2).sum(-1).mean() / dim)

    def auxiliary_loss(self) -> torch.Tensor | None:
        if self.proxy is None or not self.proxy_loss:
            return None
        return self.proxy_loss * self.proxy.loss()

    # encoder attention: hook for tokenizers that restrict what a latent may see (FlexTok)
    def encoder_mask(self, device) -> torch.Tensor | None:
        return None

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        b = images.shape[0]
        if self.mixer == "linear":
            return self.grid_to_tokens(self.stem(images * 2 - 1))
        patches = self.stem(images * 2 - 1).flatten(2).transpose(1, 2) + self.patch_pos
        latents = self.latent_tokens.expand(b, -1, -1)
        if self.shortcut:
            narrow = self.grid_narrow(patches).flatten(1)
            latents = latents + self.latent_widen(
                self.grid_to_latents(narrow).view(b, self.num_latents, self.shortcut))
        x = torch.cat([patches, latents], dim=1)
        x = self.encoder(x, self.encoder_mask(images.device))
        return self.to_code(x[:, -self.num_latents:])

    def latent_inputs(self, latents: torch.Tensor, keep: torch.Tensor):
        """Decoder inputs for the latents and a key mask (True = visible). Latents past ``keep``
        are hidden from attention: the decoder sees exactly the kept prefix."""
        x = self.from_code(latents) + self.latent_pos
        visible = torch.arange(self.num_latents, device=latents.device)[None, :] < keep[:, None]
        return x, visible

    def decode_latents(self, latents: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return (self.pixels(self.decode_grid(latents, keep)) + 1) / 2

    def predict_proxy_codes(self, latents: torch.Tensor, keep: torch.Tensor) -> None:
        if self.proxy is None:
            super().predict_proxy_codes(latents, keep)
        self.proxy.predict_codes(self.decode_grid(latents, keep))

    def decode_grid(self, latents: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The kept latents -> the decoder's feature grid (B, width, g, g), before pixels."""
        b = latents.shape[0]
        if self.mixer == "linear":
            return self.tokens_to_grid(latents, keep)
        n_patches = self.grid * self.grid
        lat, visible = self.latent_inputs(latents, keep)
        grid = (self.mask_token + self.decoder_pos).expand(b, -1, -1)
        if self.shortcut:
            kept = (torch.arange(self.num_latents, device=latents.device)[None, :]
                    < keep[:, None]).to(latents.dtype)
            codes = torch.cat([latents * kept[..., None], kept[..., None]], dim=-1).flatten(1)
            grid = grid + self.grid_widen(
                self.latents_to_grid(codes).view(b, n_patches, self.shortcut))
        x = torch.cat([grid, lat], dim=1)
        keys = torch.cat([torch.ones(b, n_patches, dtype=torch.bool, device=x.device), visible], 1)
        x = self.decoder(x, keys[:, None, None, :])
        return x[:, :n_patches].transpose(1, 2).reshape(b, -1, self.grid, self.grid)
