"""TiTok's two-stage recipe: a 1D tokenizer built around a trained 2D grid tokenizer (the proxy).

Yu et al. (2024, §3.3) found 1D tokenizers hard to train from pixels alone, and first train
TiTok against the "proxy codes" of an off-the-shelf 2D tokenizer (MaskGIT-VQGAN): TiTok's
decoder predicts the 2D tokenizer's grid of codes, and the frozen 2D decoder turns them into
pixels. Here the proxy is one of tokctl's own :class:`~tokctl.imagetok.models.VQ2D` tokenizers
(the shipped ``vq2d``), and it serves both ends of the 1D bottleneck:

- ``Proxy.encode`` reads an image with the frozen proxy: its grid of code vectors is what the
  1D encoder sees. The 1D tokens re-code the proxy's tokens: fewer of them, any prefix
  decodable, each one describing the whole image. (The proxy's 128-wide features were tried as
  the input instead: 8192 numbers per image, and the 1D encoder learnt little from them in
  a CPU budget; from the 192 code values even a linear map learns a coarse-to-fine code.)
- ``Proxy.decode`` turns the 1D decoder's grid into the proxy's code values (one vector of the
  proxy quantiser's dimension per cell, continuous) and decodes them with the proxy's decoder,
  frozen unless ``tune_decoder`` (TiTok's second stage fine-tunes it).

The proxy loss (``proxy_loss`` x mean squared error between the predicted code values and the
proxy's own quantised codes for the same image) is the stage-one target; the pixel losses are
added on top in stage two. (TiTok predicts a VQGAN's code ids with cross-entropy; an FSQ code is
a point on a grid, so the squared distance to it serves, and a near miss costs little.) The 1D tokens alone are what a token file holds: the proxy's weights live in the
tokenizer's checkpoint, and the proxy's own codes are never stored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokctl.errors import UserError


def resolve(config: dict[str, Any]) -> tuple[dict[str, Any], dict | None]:
    """A tokenizer config whose ``proxy`` names a tokenizer file (or a shipped name, ``vq2d``)
    -> the config with the proxy's own config in its place (so a saved tokenizer rebuilds
    without the file), and the proxy's weights to load once the model is built."""
    name = config.get("proxy")
    if not isinstance(name, str):
        return config, None
    from tokctl.imagetok.checkpoint import load_tokenizer

    loaded = load_tokenizer(name)
    if loaded.name != "vq2d":
        raise UserError(f"tokenizer.proxy={name}: a proxy must be a vq2d tokenizer, not "
                        f"{loaded.name}")
    if loaded.model.image_size != config.get("image_size"):
        raise UserError(f"tokenizer.proxy={name}: it takes {loaded.model.image_size}px images; "
                        f"set tokenizer.image_size={loaded.model.image_size}")
    weights = {"proxy.net." + k: v for k, v in loaded.model.state_dict().items()}
    return {**config, "proxy": loaded.config}, weights


def build_proxy(config: dict[str, Any]) -> nn.Module:
    from tokctl.imagetok.checkpoint import build_tokenizer
    from tokctl.imagetok.models.vq2d import VQ2D

    proxy = build_tokenizer(dict(config))
    if not isinstance(proxy, VQ2D):
        raise ValueError(f"a proxy must be a vq2d tokenizer, not {proxy.name}")
    return proxy


class Proxy(nn.Module):
    """Both ends of the 1D bottleneck around a proxy 2D tokenizer.

    ``encode``: image scaled to [-1, 1] (B, 3, S, S) -> (B, width, g, g): the frozen proxy's
    quantised code vector of each cell, widened to the 1D tokenizer's width (and kept as the
    target of the proxy loss).
    ``decode``: (B, width, g, g) -> image in [-1, 1], through one predicted code vector per cell
    (kept for the proxy loss) and the proxy's decoder."""

    def __init__(self, config: dict[str, Any], width: int, tune_decoder: bool = False):
        super().__init__()
        self.net = build_proxy(config)
        net = self.net
        self.grid = net.grid
        self.widen = nn.Linear(net.quantizer.dim, width)
        self.to_codes = nn.Linear(width, net.quantizer.dim)
        for name, param in net.named_parameters():
            is_decoder = name.split(".")[0] in ("from_code", "decoder_pos", "decoder", "pixels")
            param.requires_grad_(bool(tune_decoder and is_decoder))
        self.target_codes: torch.Tensor | None = None
        self.codes: torch.Tensor | None = None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        with torch.no_grad():
            self.target_codes = net.quantizer(net.encode_latents((x + 1) / 2)).values
        g = self.grid
        return self.widen(self.target_codes).transpose(1, 2).reshape(x.shape[0], -1, g, g)

    def predict_codes(self, grid: torch.Tensor) -> torch.Tensor:
        self.codes = self.to_codes(grid.flatten(2).transpose(1, 2))
        return self.codes

    def decode(self, grid: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net.decoder(net.from_code(self.predict_codes(grid)) + net.decoder_pos)
        return net.pixels(x.transpose(1, 2).reshape(grid.shape[0], -1, self.grid, self.grid))

    def loss(self) -> torch.Tensor:
        """Mean squared error between the last decoded code vectors and the proxy's codes of
        the last encoded images (the same batch in a training step)."""
        return torch.nn.functional.mse_loss(self.codes, self.target_codes)
