"""Building blocks shared by the tokenizers: a pre-norm transformer, the convolutional stem and
pixel decoder that wrap it (a 64x64 image <-> an 8x8 grid of features), and the linear maps
between a feature grid and K token slots (the transformer's cheap stand-in)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Pre-norm transformer block; ``mask`` is a boolean (B, 1, S, S) or (S, S) attention mask,
    True where attending is allowed."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, w // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, w))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class ConvStem(nn.Module):
    """Image (B, 3, H, W) -> feature grid (B, out, H / 2^n, W / 2^n): one strided conv and one
    residual block per halving. Local texture is summarised here, cheaply, so the transformer
    only has to decide what the few latent tokens keep."""

    def __init__(self, channels: tuple[int, ...], out: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 3, padding=1)]
        prev = channels[0]
        for c in channels:
            layers += [nn.Conv2d(prev, c, 4, stride=2, padding=1), ResBlock(c)]
            prev = c
        layers += [nn.SiLU(), nn.Conv2d(prev, out, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """Feature grid -> image: the mirror of :class:`ConvStem` (nearest upsampling + conv)."""

    def __init__(self, channels: tuple[int, ...], width: int):
        super().__init__()
        chans = list(channels)[::-1]
        layers: list[nn.Module] = [nn.Conv2d(width, chans[0], 1), ResBlock(chans[0])]
        prev = chans[0]
        for c in chans[1:]:
            layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(prev, c, 3, padding=1), ResBlock(c)]
            prev = c
        # the last doubling is sub-pixel (the conv runs at half resolution, then 2x2 pixels
        # per position): full-resolution 3x3 convs dominated the CPU time
        layers += [nn.SiLU(), nn.Conv2d(prev, 3 * 4, 3, padding=1), nn.PixelShuffle(2)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PatchStem(nn.Module):
    """ViT patch embedding (TiTok's): one linear map per non-overlapping patch."""

    def __init__(self, patch: int, out: int):
        super().__init__()
        self.proj = nn.Conv2d(3, out, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class PatchDecoder(nn.Module):
    """Grid features -> pixels by one linear map per patch (a ViT decoder's head)."""

    def __init__(self, patch: int, width: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(width, 3 * patch * patch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.proj(x), self.patch)


class GridToTokens(nn.Module):
    """Feature grid (B, C, g, g) -> K token vectors (B, K, dim): one learned linear map of the
    whole flattened grid, so every token may read every position (as a latent token's attention
    over the patches may), at the cost of one matrix product."""

    def __init__(self, channels: int, grid: int, tokens: int, dim: int):
        super().__init__()
        self.tokens, self.dim = tokens, dim
        self.proj = nn.Linear(channels * grid * grid, tokens * dim)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.proj(grid.flatten(1)).view(grid.shape[0], self.tokens, self.dim)


class TokensToGrid(nn.Module):
    """K token vectors of which the first ``keep[b]`` are present -> feature grid (B, C, g, g).

    One learned linear map reads each token's vector (zeros where dropped) and a "present" flag,
    so the grid is a bias plus one learned pattern per kept token: every extra token adds to
    what the prefix before it drew, and nothing past ``keep`` is seen."""

    def __init__(self, tokens: int, dim: int, channels: int, grid: int):
        super().__init__()
        self.tokens, self.channels, self.grid = tokens, channels, grid
        self.proj = nn.Linear(tokens * (dim + 1), channels * grid * grid)

    def forward(self, latents: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b = latents.shape[0]
        present = (torch.arange(self.tokens, device=latents.device)[None, :]
                   < keep[:, None]).to(latents.dtype)[..., None]
        x = torch.cat([latents * present, present], dim=-1).flatten(1)
        return self.proj(x).view(b, self.channels, self.grid, self.grid)


def image_stem(stem: str, patch_size: int, conv_channels, width: int) -> tuple[nn.Module, nn.Module]:
    """The pixels -> grid encoder and the grid -> pixels decoder of a tokenizer: strided convs
    (``conv``, one halving per channel stage) or a linear patch embedding (``patch``)."""
    if stem == "conv":
        if 2 ** len(conv_channels) != patch_size:
            raise ValueError(f"a conv stem with {len(conv_channels)} stages halves the image "
                             f"{len(conv_channels)} times: patch_size must be "
                             f"{2 ** len(conv_channels)}")
        return ConvStem(tuple(conv_channels), width), ConvDecoder(tuple(conv_channels), width)
    if stem == "patch":
        return PatchStem(patch_size, width), PatchDecoder(patch_size, width)
    raise ValueError(f"stem must be 'conv' or 'patch', not {stem!r}")
