"""What every image tokenizer offers, whatever its shape (1D latents or a 2D grid).

Images are float tensors (B, 3, S, S) in [0, 1] at the tokenizer's ``image_size``. Tokens are a
flat stream per image, ``max_tokens`` long at most: ``depth`` ids per latent vector (1 except for
residual VQ), latent by latent. Variable-length tokenizers decode any prefix of that stream.
"""

from __future__ import annotations

import torch
from torch import nn

from tokctl.imagetok.quantizers import Quantized, Quantizer


class ImageTokenizer(nn.Module):
    name: str = "tokenizer"
    #: True when any prefix of the token stream decodes (trained with tail drop / nested dropout)
    variable_length: bool = False

    def __init__(self, image_size: int, quantizer: Quantizer, num_latents: int):
        super().__init__()
        self.image_size = int(image_size)
        self.quantizer = quantizer
        self.num_latents = int(num_latents)

    @property
    def max_tokens(self) -> int:
        return self.num_latents * self.quantizer.depth

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    # --- to implement --------------------------------------------------------------------------
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, num_latents, quantizer.dim), before quantisation."""
        raise NotImplementedError

    def decode_latents(self, latents: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(B, num_latents, dim) quantised vectors, of which the first ``keep[b]`` are present,
        -> (B, 3, S, S) images in [0, 1] (not clamped)."""
        raise NotImplementedError

    def training_keep(self, batch: int, device) -> torch.Tensor:
        """How many latents each training sample keeps (all, unless the method drops some)."""
        return torch.full((batch,), self.num_latents, dtype=torch.long, device=device)

    def auxiliary_loss(self) -> torch.Tensor | None:
        """A training loss term of the last forward pass beyond reconstruction (none here)."""
        return None

    def token_metric(self) -> torch.Tensor | None:
        """(num_latents, dim, dim) positive semi-definite matrices G_i such that changing latent i
        by d changes what the decoder reads by about d^T G_i d, scaled to a mean trace of dim;
        None where no such fixed metric exists (rate-aware encoding, rdo.py, then measures plain
        latent distance)."""
        return None

    def predict_proxy_codes(self, latents: torch.Tensor, keep: torch.Tensor) -> None:
        """Decode as far as a proxy tokenizer's codes, not to pixels (TiTok's first stage)."""
        raise NotImplementedError(f"{self.name} has no proxy tokenizer")

    # --- shared --------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, quantize: bool = True,
                keep: torch.Tensor | None = None, pixels: bool = True
                ) -> tuple[torch.Tensor | None, Quantized | None]:
        """Training pass: reconstruction and the quantiser's record. ``quantize=False`` is the
        autoencoder warm-up (continuous latents); ``pixels=False`` stops at the proxy's codes
        (no reconstruction is returned; the proxy loss is the only target)."""
        z = self.encode_latents(images)
        q = None
        if quantize:
            q = self.quantizer(z)
            z = q.values
        elif hasattr(self.quantizer, "relax"):
            z = self.quantizer.relax(z)
        if keep is None:
            keep = self.training_keep(images.shape[0], images.device) if self.training else \
                torch.full((images.shape[0],), self.num_latents, device=images.device)
        if not pixels:
            self.predict_proxy_codes(z, keep)
            return None, q
        return self.decode_latents(z, keep), q

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, max_tokens) int64 token stream."""
        q = self.quantizer(self.encode_latents(images))
        return q.ids.reshape(images.shape[0], -1)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, n) token streams, n <= max_tokens (a prefix) -> (B, 3, S, S) images in [0, 1]."""
        b, n = tokens.shape
        if n > self.max_tokens:
            raise ValueError(f"{n} tokens given; this tokenizer holds at most {self.max_tokens}")
        depth = self.quantizer.depth
        full = torch.full((b, self.max_tokens), -1, dtype=torch.long, device=tokens.device)
        full[:, :n] = tokens
        ids = full.view(b, self.num_latents, depth)
        latents = self.quantizer.embed(ids)
        keep = torch.full((b,), -(-n // depth), dtype=torch.long, device=tokens.device)
        return self.decode_latents(latents, keep).clamp(0, 1)


def prefix_budgets(model: ImageTokenizer) -> list[int]:
    """Token counts a tokenizer is measured at: 8, 16, 32, ... and its maximum for variable-length
    tokenizers (any prefix decodes), the maximum alone for fixed-length ones."""
    if not model.variable_length:
        return [model.max_tokens]
    out, n = [], 8
    while n < model.max_tokens:
        out.append(n)
        n *= 2
    return out + [model.max_tokens]
