"""Analytic cost of a ViT forward from its per-layer token counts.

Counted as multiply-adds, the convention of the ViT token-reduction literature (ViT-B/16 at
224x224 = 17.6 "GFLOPs"), so figures compare with the papers'. A block with ``n`` tokens entering
the attention and ``m`` entering the MLP (fewer when a method reduces tokens in between) costs

    attention: 4*n*C^2 (q, k, v, output projections) + 2*n^2*C (scores and weighted sum)
    MLP:       2*m*C*C_mlp

plus the patch embedding and the classifier. What a method adds itself (clustering iterations,
slimming modules) is added by the method's ``overhead_macs``; matching and sorting are not counted.
"""

from __future__ import annotations


def attention_macs(n, hidden: int):
    return 4 * n * hidden * hidden + 2 * n * n * hidden


def mlp_macs(m, hidden: int, mlp_hidden: int):
    return 2 * m * hidden * mlp_hidden


def model_macs(info, tokens: list[tuple[int, int]], include_embed: bool = True) -> float:
    """Multiply-adds for one image, given (attention, MLP) token counts per layer."""
    total = 0.0
    for n, m in tokens:
        total += attention_macs(n, info.hidden_size) + mlp_macs(m, info.hidden_size, info.mlp_hidden)
    if include_embed:
        total += info.num_patches * info.hidden_size * info.patch_size ** 2 * info.num_channels
        total += info.hidden_size * max(info.num_labels, 0)
    return float(total)


def gflops(info, tokens: list[tuple[int, int]], overhead_macs: float = 0.0) -> float:
    return (model_macs(info, tokens) + overhead_macs) / 1e9
