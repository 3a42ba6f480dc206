"""ToMe (Bolya et al., ICLR 2023, "Token Merging: Your ViT But Faster").

In every block, between the attention and the MLP, ``r`` tokens are merged away by bipartite
soft matching on the attention keys (averaged over heads): tokens alternate between two sets,
each token of the first set picks its most similar token of the second, and the ``r`` most
similar pairs are merged by a size-weighted average. Sizes are carried across blocks and enter
the attention as log(size) (proportional attention). Prefix tokens ([CLS], distillation,
registers) are never merged. The merge itself is ``tokctl.kernels.token_merge``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from tokctl.kernels.token_merge import MergeResult, token_merge
from tokctl.errors import UserError
from tokctl.vit.patch import TokenMethod


def parse_r(depth: int, r: int | Sequence[int], inflect: float = 0.0) -> list[int]:
    """Per-layer r: a list as given (padded with zeros), or ToMe's schedule for an int: a line
    from r*(1-inflect) to r*(1+inflect) over the layers (inflect 0: constant; < 0: more merging
    early; > 0: more merging late), keeping about r per layer on average."""
    if isinstance(r, (list, tuple)) or hasattr(r, "__len__"):
        values = [int(v) for v in r]
        if len(values) > depth:
            raise UserError(f"method.r has {len(values)} values but the model has {depth} layers")
        if any(v < 0 for v in values):
            raise UserError("method.r values must be >= 0")
        return values + [0] * (depth - len(values))
    r = int(r)
    if r < 0:
        raise UserError(f"method.r={r} must be >= 0")
    if not -1.0 <= inflect <= 1.0:
        raise UserError(f"method.inflect={inflect} must be within [-1, 1]")
    low = int(r * (1.0 - inflect))
    high = 2 * r - low
    step = (high - low) / max(1, depth - 1)
    return [int(low + step * i) for i in range(depth)]


def merge_like(t: torch.Tensor, res: MergeResult, reduce: str) -> torch.Tensor:
    """Apply the same merge to another per-token tensor (B, N, D): e.g. the source map with
    reduce='amax' (a token stands for every patch of the tokens merged into it)."""
    a, b = t[:, ::2], t[:, 1::2]
    d = t.shape[-1]
    unm = a.gather(1, res.unm_idx[..., None].expand(-1, -1, d))
    src = a.gather(1, res.src_idx[..., None].expand(-1, -1, d))
    b = b.scatter_reduce(1, res.dst_idx[..., None].expand(-1, -1, d), src, reduce=reduce)
    return torch.cat([unm, b], dim=1)


def largest_constant_r(patches: int, depth: int) -> int:
    best = 0
    for r in range(1, patches // 2 + 1):
        n, ok = patches, True
        for _ in range(depth):
            if r > n // 2:
                ok = False
                break
            n -= r
        if not ok:
            break
        best = r
    return best


class ToMe(TokenMethod):
    name = "tome"

    def __init__(self, r: int | Sequence[int] = 8, inflect: float = 0.0, prop_attn: bool = True):
        super().__init__()
        self.r, self.inflect, self.prop_attn = r, inflect, prop_attn
        self.r_per_layer: list[int] = []

    def setup(self, info) -> None:
        self.r_per_layer = parse_r(info.depth, self.r, self.inflect)
        n = info.num_patches
        for layer, r in enumerate(self.r_per_layer):
            if r > n // 2:
                raise UserError(
                    f"method.r={self.r} is too large for this model: layer {layer} would merge {r} of "
                    f"its {n} patch tokens (at most half can merge); the largest constant r for "
                    f"{info.num_patches} patches and {info.depth} layers is "
                    f"{largest_constant_r(info.num_patches, info.depth)}")
            n -= r

    def planned_tokens(self, info):
        out, n = [], info.num_tokens
        for r in parse_r(info.depth, self.r, self.inflect):
            out.append((n, n - r))
            n -= r
        return out

    def after_attention(self, index, x, attn, st):
        r = self.r_per_layer[index]
        if r == 0:
            return x
        p = st.prefix
        size = st.sizes(x)
        res = token_merge(x[:, p:], size[:, p:], attn.key_metric()[:, p:], r)
        st.size = torch.cat([size[:, :p], res.size], dim=1)
        if st.source is not None:
            st.source = torch.cat([st.source[:, :p], merge_like(st.source[:, p:], res, "amax")], dim=1)
        return torch.cat([x[:, :p], res.x], dim=1)

    def describe(self):
        return {"method": self.name, "r": list(self.r) if hasattr(self.r, "__len__") else self.r,
                "r_per_layer": self.r_per_layer, "prop_attn": self.prop_attn}
