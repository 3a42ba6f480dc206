"""Token clustering and reconstruction (Liang et al., NeurIPS 2022, "Expediting Large-Scale
Vision Transformer for Dense Prediction without Fine-tuning").

Two parameter-free layers. After block ``cluster_after`` (the paper's alpha) the patch tokens are
clustered into an ``h x w`` grid of cluster tokens: centres start as the average-pooled grid, then
a few iterations of local soft k-means update them (each patch is softly assigned to the centres
within ``window`` grid cells of its initial one, and each centre becomes the weighted mean of its
patches). The blocks up to ``reconstruct_after`` (beta) run on the prefix tokens + the clusters.
Then every patch token is rebuilt as a weighted sum of the refined cluster tokens, with weights
from the relation between the patches and the clusters at clustering time (its ``k`` nearest
clusters, softmax of their distance). Later blocks run at full resolution again, so dense outputs
keep their shape; the fidelity of those patch features is what this method is judged on.

Distances enter the softmaxes divided by their mean and a temperature: the paper's absolute
temperature depends on each model's feature scale (its code uses different constants per model);
a relative one carries over between models.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from tokctl.errors import UserError
from tokctl.vit.patch import TokenMethod


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared euclidean distances between rows: a (B, M, C), b (B, K, C) -> (B, M, K)."""
    d = (a * a).sum(-1, keepdim=True) + (b * b).sum(-1)[:, None, :] - 2 * a @ b.transpose(-1, -2)
    return d.clamp_min_(0)


def local_kmeans(patches: torch.Tensor, grid: tuple[int, int], clusters: tuple[int, int], iters: int,
                 window: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster (B, H*W, C) patch tokens into (B, h*w, C) centres; also the hard assignment (B, H*W)."""
    b, n, c = patches.shape
    (H, W), (h, w) = grid, clusters
    fmap = patches.transpose(1, 2).reshape(b, c, H, W)
    centres = F.adaptive_avg_pool2d(fmap, (h, w)).reshape(b, c, h * w).transpose(1, 2)
    # Each patch may only join the centres near the one it started in.
    labels = torch.arange(h * w, device=patches.device, dtype=torch.float32).reshape(1, 1, h, w)
    start = F.interpolate(labels, size=(H, W), mode="nearest").reshape(H * W).long()
    centre_ids = torch.arange(h * w, device=patches.device)
    radius = window // 2
    near = ((start[:, None] // w - centre_ids[None, :] // w).abs() <= radius) & \
           ((start[:, None] % w - centre_ids[None, :] % w).abs() <= radius)  # (H*W, h*w)
    for _ in range(iters):
        dist = _sq_dist(patches, centres)
        # Per image, so that an image's clusters never depend on the rest of its batch.
        scale = ((dist * near).sum((1, 2), keepdim=True) / near.sum()).clamp_min(1e-12)
        logits = (-dist / (tau * scale)).masked_fill(~near, float("-inf"))
        assign = logits.softmax(-1)  # over centres, per patch
        centres = (assign.transpose(1, 2) @ patches) / assign.sum(1)[..., None].clamp_min(1e-12)
    hard = _sq_dist(patches, centres).masked_fill(~near, float("inf")).argmin(-1)
    return centres, hard


def reconstruction_weights(before: torch.Tensor, centres: torch.Tensor, k: int, tau: float) -> torch.Tensor:
    """(B, N, K): each patch's weights over its k nearest clusters (softmax of -distance)."""
    dist = _sq_dist(before, centres)
    k = min(k, centres.shape[1])
    top, idx = dist.topk(k, dim=-1, largest=False)
    scale = top.mean((1, 2), keepdim=True).clamp_min(1e-12)
    weights = torch.zeros_like(dist)
    weights.scatter_(-1, idx, (-top / (tau * scale)).softmax(-1))
    return weights


class ClusterTokens(TokenMethod):
    name = "cluster"
    prop_attn = False  # cluster tokens are not counted as several patches in the paper

    def __init__(self, clusters: Sequence[int] = (7, 7), cluster_after: int = 1,
                 reconstruct_after: int | None = None, iters: int = 5, window: int = 5,
                 tau: float = 0.1, k: int = 20, tau_reconstruct: float = 0.1):
        super().__init__()
        if len(clusters) != 2 or min(clusters) < 1:
            raise UserError(f"method.clusters={list(clusters)} must be [rows, columns] of at least 1")
        if window < 1 or window % 2 == 0:
            raise UserError(f"method.window={window} must be an odd positive number of grid cells")
        if iters < 1 or k < 1 or tau <= 0 or tau_reconstruct <= 0:
            raise UserError("method.iters and method.k must be >= 1, the temperatures > 0")
        self.clusters = (int(clusters[0]), int(clusters[1]))
        self.cluster_after, self.reconstruct_cfg = int(cluster_after), reconstruct_after
        self.iters, self.window, self.tau = int(iters), int(window), float(tau)
        self.k, self.tau_reconstruct = int(k), float(tau_reconstruct)
        self.reconstruct_after = 0

    def setup(self, info) -> None:
        last = info.depth - 1
        self.reconstruct_after = last if self.reconstruct_cfg is None else int(self.reconstruct_cfg)
        if not 0 <= self.cluster_after < self.reconstruct_after <= last:
            raise UserError(f"need 0 <= method.cluster_after ({self.cluster_after}) < "
                            f"method.reconstruct_after ({self.reconstruct_after}) <= {last}")
        h, w = self.clusters
        if h > info.grid[0] or w > info.grid[1]:
            raise UserError(f"method.clusters={list(self.clusters)} is finer than the {info.grid[0]}x"
                            f"{info.grid[1]} patch grid")

    def planned_tokens(self, info):
        reconstruct = info.depth - 1 if self.reconstruct_cfg is None else int(self.reconstruct_cfg)
        small = info.prefix_tokens + self.clusters[0] * self.clusters[1]
        out = []
        for layer in range(info.depth):
            n = small if self.cluster_after < layer <= reconstruct else info.num_tokens
            out.append((n, n))
        return out

    def overhead_macs(self, info) -> float:
        n, k, c = info.num_patches, self.clusters[0] * self.clusters[1], info.hidden_size
        clustering = (self.iters + 1) * 2 * n * k * c
        reconstruction = 2 * n * k * c
        return float(clustering + reconstruction)

    def after_block(self, index, x, st):
        p = st.prefix
        if index == self.cluster_after:
            patches = x[:, p:]
            centres, hard = local_kmeans(patches.float(), st.grid, self.clusters, self.iters, self.window, self.tau)
            centres = centres.to(x.dtype)
            st.scratch["before"], st.scratch["centres"] = patches, centres
            if st.source is not None:
                onehot = F.one_hot(hard, centres.shape[1]).transpose(1, 2).float()  # (B, K, N)
                st.scratch["patch_source"] = st.source[:, p:]
                st.source = torch.cat([st.source[:, :p], onehot @ st.source[:, p:]], dim=1).clamp_max(1)
                st.scratch["groups"] = st.source
            return torch.cat([x[:, :p], centres], dim=1)
        if index == self.reconstruct_after and "before" in st.scratch:
            weights = reconstruction_weights(st.scratch["before"].float(), st.scratch["centres"].float(),
                                             self.k, self.tau_reconstruct).to(x.dtype)
            if st.source is not None:
                st.source = torch.cat([st.source[:, :p], st.scratch["patch_source"]], dim=1)
            return torch.cat([x[:, :p], weights @ x[:, p:]], dim=1)
        return x

    def describe(self):
        return {"method": self.name, "clusters": list(self.clusters), "cluster_after": self.cluster_after,
                "reconstruct_after": self.reconstruct_after, "iters": self.iters, "window": self.window}
