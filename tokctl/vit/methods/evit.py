"""EViT (Liang et al., ICLR 2022, "Not All Patches are What You Need").

At a few layers, after the attention, only the ``keep_rate`` fraction of patch tokens with the
highest attention from [CLS] (averaged over heads) is kept; the others are fused into one token,
their sum weighted by that same attention, appended after the kept ones. The fused token is an
ordinary token in later layers. The paper fine-tunes the model with this in place; here it runs
off the shelf.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from tokctl.errors import UserError
from tokctl.vit.patch import TokenMethod


def default_locations(depth: int) -> list[int]:
    """The paper's layers 4, 7 and 10 of 12 (indices 3, 6, 9), at the same relative depths."""
    return sorted({max(1, round(depth * f)) for f in (0.25, 0.5, 0.75)})


class EViT(TokenMethod):
    name = "evit"
    prop_attn = False  # EViT has no token sizes

    def __init__(self, keep_rate: float = 0.7, locations: Sequence[int] | None = None, fuse_token: bool = True):
        super().__init__()
        if not 0.0 < keep_rate <= 1.0:
            raise UserError(f"method.keep_rate={keep_rate} must be within (0, 1]")
        self.keep_rate, self.fuse_token = float(keep_rate), bool(fuse_token)
        self.locations_cfg = list(locations) if locations is not None else None
        self.locations: list[int] = []

    def setup(self, info) -> None:
        if info.prefix_tokens < 1:
            raise UserError("method=evit scores tokens by [CLS] attention; this model has no class token")
        self.locations = self.locations_cfg if self.locations_cfg is not None else default_locations(info.depth)
        bad = [i for i in self.locations if not 0 <= int(i) < info.depth]
        if bad:
            raise UserError(f"method.locations {bad} outside the model's layers 0..{info.depth - 1}")
        self.locations = sorted(int(i) for i in self.locations)

    def _kept(self, n: int) -> int:
        return math.ceil(self.keep_rate * n)

    def planned_tokens(self, info):
        out, n = [], info.num_patches
        locations = self.locations_cfg if self.locations_cfg is not None else default_locations(info.depth)
        for layer in range(info.depth):
            before = n
            if layer in locations and self._kept(n) < n:
                n = self._kept(n) + int(self.fuse_token)
            out.append((before + info.prefix_tokens, n + info.prefix_tokens))
        return out

    def after_attention(self, index, x, attn, st):
        if index not in self.locations:
            return x
        p = st.prefix
        n = x.shape[1] - p
        left = self._kept(n)
        if left >= n:
            return x
        scores = attn.cls_attention()[:, p:]  # (B, n)
        order = scores.argsort(dim=1, descending=True)
        keep, drop = order[:, :left], order[:, left:]
        tokens = x[:, p:]
        kept = tokens.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        parts = [x[:, :p], kept]
        if self.fuse_token:
            w = scores.gather(1, drop).to(x.dtype)
            dropped = tokens.gather(1, drop[..., None].expand(-1, -1, x.shape[-1]))
            parts.append((dropped * w[..., None]).sum(1, keepdim=True))
        if st.source is not None:
            src = st.source[:, p:]
            kept_src = src.gather(1, keep[..., None].expand(-1, -1, src.shape[-1]))
            new = [st.source[:, :p], kept_src]
            if self.fuse_token:
                new.append(src.gather(1, drop[..., None].expand(-1, -1, src.shape[-1])).amax(1, keepdim=True))
            st.source = torch.cat(new, dim=1)
        return torch.cat(parts, dim=1)

    def describe(self):
        return {"method": self.name, "keep_rate": self.keep_rate, "locations": self.locations,
                "fuse_token": self.fuse_token}
