"""ToMe (Bolya et al., ICLR 2023, "Token Merging: Your ViT But Faster"), as the official code runs it.

In every block, between the attention and the MLP, ``r`` tokens are merged away by bipartite
soft matching on the attention keys (averaged over heads): tokens alternate between two sets over
the whole sequence, each token of the first set picks its most similar token of the second, and
the ``r`` most similar pairs are merged by a size-weighted average. Sizes are carried across
blocks and enter the attention as log(size) (proportional attention). Prefix tokens ([CLS],
distillation, registers) are never merged. The merge and its conventions (which tokens are in
which set, the order of the survivors) are ``tokctl.kernels.token_merge``'s.

Like the official code, r is lowered in a layer where fewer than 2r unprotected tokens remain
(r=16 on ViT-B/16 merges 10 in its last layer); tokctl says so once, when patching.

The whole block (attention, merge, MLP) is one function of tensors, :meth:`ToMe.fused_block`,
which the patcher runs as it is or through ``torch.compile`` (``compile=true``): each layer's
token count is known in advance, so every layer compiles to one static-shape graph.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from tokctl.console import console
from tokctl.errors import UserError
from tokctl.kernels.token_merge import MergeResult, max_r, merge_apply, token_merge
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


def clamp_r(requested: list[int], tokens: int, protected: int) -> list[int]:
    """The r each layer really merges: at most half of the unprotected tokens left (ToMe's rule)."""
    out = []
    for r in requested:
        r = min(r, max_r(tokens, protected))
        out.append(r)
        tokens -= r
    return out


def merge_like(t: torch.Tensor, res: MergeResult, protected: int, reduce: str) -> torch.Tensor:
    """Apply the same merge to another per-token tensor (B, N, D): e.g. the source map with
    reduce='amax' (a token stands for every patch of the tokens merged into it)."""
    return merge_apply(t, res.unm_idx, res.src_idx, res.dst_idx, protected, reduce)


class ToMe(TokenMethod):
    name = "tome"

    def __init__(self, r: int | Sequence[int] = 8, inflect: float = 0.0, prop_attn: bool = True):
        super().__init__()
        self.r, self.inflect, self.prop_attn = r, inflect, prop_attn
        self.r_per_layer: list[int] = []
        self.protected = 0
        self.kernel: bool | None = None  # the merge's implementation; None: by device (eager)

    def setup(self, info) -> None:
        requested = parse_r(info.depth, self.r, self.inflect)
        self.protected = info.prefix_tokens
        self.r_per_layer = clamp_r(requested, info.num_tokens, self.protected)
        lowered = [(i, want, got) for i, (want, got) in enumerate(zip(requested, self.r_per_layer)) if got < want]
        if lowered:
            where = ", ".join(f"layer {i}: {want} -> {got}" for i, want, got in lowered)
            console.print(f"[yellow]warning[/]: method.r lowered as ToMe does where too few tokens remain "
                          f"(a layer merges at most half its unprotected tokens): {where}", soft_wrap=True)

    def planned_tokens(self, info):
        out, n = [], info.num_tokens
        for r in clamp_r(parse_r(info.depth, self.r, self.inflect), info.num_tokens, info.prefix_tokens):
            out.append((n, n - r))
            n -= r
        return out

    def after_attention(self, index, x, attn, st):
        # The hooked path (a method composed with others); the patcher prefers fused_block.
        r = self.r_per_layer[index]
        if r == 0:
            return x
        res = token_merge(x, st.size, attn.key_metric(), r, st.prefix, kernel=self.kernel)
        st.size = res.size
        if st.source is not None:
            st.source = merge_like(st.source, res, st.prefix, "amax")
        return res.x

    def fused_block(self, index: int, parts, x: torch.Tensor, size: torch.Tensor | None):
        """One block, as ToMe's timm patch runs it, from tensors to tensors:
        x + attn(norm1(x)) with log(size) added to the logits, the merge on the keys averaged over
        heads, x + mlp(norm2(x)). Returns (x, size, merge result or None)."""
        b, n, _ = x.shape
        q, k, v = parts.project(parts.norm1(x))
        bias = size.log().to(q.dtype)[:, None, None, :, 0] if (self.prop_attn and size is not None) else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=parts.scale)
        out = parts.out_proj(out.transpose(1, 2).reshape(b, n, -1))
        x = x + (parts.ls1(out) if parts.ls1 is not None else out)
        res = None
        r = self.r_per_layer[index]
        if r > 0:
            res = token_merge(x, size, k.mean(1), r, self.protected, kernel=self.kernel)
            x, size = res.x, res.size
        h = parts.mlp(parts.norm2(x))
        return x + (parts.ls2(h) if parts.ls2 is not None else h), size, res

    def describe(self):
        return {"method": self.name, "r": list(self.r) if hasattr(self.r, "__len__") else self.r,
                "r_per_layer": self.r_per_layer, "prop_attn": self.prop_attn}
