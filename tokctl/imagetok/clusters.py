"""Clusters of training crops, the condition of a cluster-conditional token prior.

The training photos carry no class labels, so a conditional prior (``prior.conditions=N`` in
`tokctl tokenize-image prior train`) conditions on the cluster of each crop instead: k-means
over the crop's colour layout, its average colour in each cell of a 4x4 grid (48 numbers).
Colour layout is what a 64-token image keeps most faithfully, so a cluster is something the
prior can actually follow, and whether it did is checkable on the generated images: the share of
images conditioned on cluster c whose own colour layout lies nearest to centroid c
(`tokenize-image sample condition=c` reports it as ``cluster_match``, beside the share of training
crops in c, which is what an unconditional prior would score).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GRID = 4
FEATURES = 3 * GRID * GRID


def colour_layout(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] -> (B, FEATURES): the mean colour of each cell of a 4x4 grid."""
    return F.adaptive_avg_pool2d(images.float().clamp(0, 1), GRID).flatten(1)


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(B,) index of the centroid nearest to each row of ``x``."""
    return torch.cdist(x.float(), centroids.float()).argmin(1)


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 30) -> torch.Tensor:
    """(k, D) centroids of ``x`` (N, D): k-means++ seeding, then Lloyd's iterations. A cluster
    that empties takes the point farthest from its centroid, so all k stay in use."""
    x = x.float()
    if k > len(x):
        raise ValueError(f"{k} clusters of {len(x)} crops: give more data.crops or fewer conditions")
    centroids = x[torch.randint(len(x), (1,), generator=generator)]
    for _ in range(1, k):  # each next seed drawn with probability proportional to squared distance
        d2 = torch.cdist(x, centroids).min(1).values.square()
        centroids = torch.cat([centroids, x[torch.multinomial(d2 + 1e-12, 1, generator=generator)]])
    for _ in range(iterations):
        labels = nearest(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp(min=1)[:, None])
        if empty.any():
            far = (x - centroids[labels]).square().sum(1).topk(int(empty.sum())).indices
            centroids[empty] = x[far]
    return centroids
