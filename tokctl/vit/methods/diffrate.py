"""DiffRate (Chen et al., ICCV 2023, "DiffRate: Differentiable Compression Rate for Efficient
Vision Transformers").

Every block, after the attention, sorts the patch tokens by [CLS] attention, prunes the tail down
to ``prune_kept`` tokens, then merges the least important of the rest into the most similar of
the ``merge_kept`` most important ones (cosine similarity of the token features; a merged-in
token's size is scaled by that similarity). The per-layer kept counts are not hand-picked: a short
search learns them with the backbone frozen. Each layer holds a distribution over candidate kept
counts (every ``granularity`` tokens); the expected count, rounded up with a straight-through
estimator, gives both a differentiable FLOPs estimate and a soft token mask (the probability that
a token at that rank survives), so the loss

    task loss + lambda * (FLOPs / FLOPs_uncompressed - target)^2

reaches the distributions through the attention (masked tokens are cut out of the softmax) and
through the FLOPs term. The found counts are saved (``diffrate_rates.json``) and reused with
``method.rates=PATH``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tokctl.errors import UserError
from tokctl.vit.flops import attention_macs, mlp_macs, model_macs
from tokctl.vit.patch import TokenMethod


class _CeilSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.ceil(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _MinSTE(torch.autograd.Function):
    """min(n, a, b) whose gradient reaches both candidate counts a and b (as in the paper's code),
    so each distribution feels the FLOPs pressure even when the other one is the binding one."""

    @staticmethod
    def forward(ctx, n, a, b):
        return torch.minimum(torch.minimum(n, a), b)

    @staticmethod
    def backward(ctx, g):
        return None, g, g


class RateDistribution(nn.Module):
    """A learnable distribution over how many patch tokens a layer keeps."""

    def __init__(self, patches: int, granularity: int):
        super().__init__()
        self.register_buffer("candidates", torch.arange(patches, 0, -granularity).float(), persistent=False)
        self.logits = nn.Parameter(torch.zeros(len(self.candidates)))

    def expected_kept(self) -> torch.Tensor:
        return _CeilSTE.apply(self.candidates @ self.logits.softmax(-1))

    def survival(self, length: int, prefix: int) -> torch.Tensor:
        """P(token at rank i is kept) for ranks 0..length-1 (prefix tokens always are)."""
        probs = self.logits.softmax(-1)
        ranks = torch.arange(length, device=probs.device)[:, None]
        alive = (ranks < (self.candidates[None, :] + prefix)).float()
        return alive @ probs


def _straight_through_mask(prob: torch.Tensor, kept: int, upto: int) -> torch.Tensor:
    """Hard 0 for ranks in [kept, upto), 1 elsewhere; the gradient of ``prob``."""
    hard = torch.ones_like(prob)
    hard[kept:upto] = 0
    return hard - prob.detach() + prob


def _similarity_merge(x: torch.Tensor, size: torch.Tensor, kept: int, prefix: int, keep_tail: bool):
    """Merge tokens [kept:] of ``x`` into the most similar of tokens [prefix:kept] (plain mean, as
    the paper does); sizes add up, each merged-in size scaled by its similarity."""
    with torch.no_grad():
        metric = x.detach() / x.detach().norm(dim=-1, keepdim=True)
        sim = metric[:, kept:] @ metric[:, :kept].transpose(-1, -2)
        sim[..., :prefix] = -math.inf
        node_max, node_idx = sim.max(dim=-1)
    idx = node_idx[..., None]
    src, dst = x[:, kept:], x[:, :kept]
    merged = dst.scatter_reduce(1, idx.expand(-1, -1, x.shape[-1]), src, reduce="mean")
    src_size = size[:, kept:] * node_max[..., None]
    if keep_tail:
        src_size = src_size.clamp(min=1)
    new_size = size[:, :kept].scatter_reduce(1, idx, src_size, reduce="sum")
    if keep_tail:
        return torch.cat([merged, src], 1), torch.cat([new_size, size[:, kept:]], 1), idx
    return merged, new_size.clamp(min=1e-3), idx


class DiffRate(TokenMethod):
    name = "diffrate"

    def __init__(self, rates: Any = None, target_flops: float = 0.6, granularity: int = 4,
                 search: dict | None = None, prop_attn: bool = True):
        super().__init__()
        self.rates_cfg = rates
        self.target_flops = float(target_flops)
        if not 0.0 < self.target_flops <= 1.0:
            raise UserError(f"method.target_flops={target_flops} must be a fraction of the "
                            f"uncompressed FLOPs, within (0, 1]")
        self.granularity = int(granularity)
        if self.granularity < 1:
            raise UserError("method.granularity must be >= 1")
        self.search_cfg = dict(search or {})
        self.prop_attn = prop_attn
        self.prune_kept: list[int] = []
        self.merge_kept: list[int] = []
        self.searching = False
        self.prune_dist = nn.ModuleList()
        self.merge_dist = nn.ModuleList()
        self.info = None

    # --------------------------------------------------------------------------- rates
    @property
    def needs_search(self) -> bool:
        return not self.prune_kept

    def setup(self, info) -> None:
        if info.prefix_tokens < 1:
            raise UserError("method=diffrate ranks tokens by [CLS] attention; this model has no class token")
        self.info = info
        if self.rates_cfg is not None and not self.prune_kept:
            self.load_rates(self.rates_cfg)
        if self.prune_kept:
            self._check_rates(info)

    def load_rates(self, rates: Any) -> None:
        if isinstance(rates, (str, Path)):
            path = Path(rates).expanduser()
            if path.is_dir():
                path = path / "diffrate_rates.json"
            if not path.is_file():
                raise UserError(f"method.rates={rates}: no such file (a diffrate_rates.json from an "
                                f"earlier run, or a run folder holding one)")
            try:
                rates = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise UserError(f"method.rates={path} is not JSON: {exc}") from None
        try:
            self.prune_kept = [int(v) for v in rates["prune_kept"]]
            self.merge_kept = [int(v) for v in rates["merge_kept"]]
        except (KeyError, TypeError, ValueError):
            raise UserError("method.rates needs lists prune_kept and merge_kept (tokens kept per layer, "
                            "prefix included)") from None

    def _check_rates(self, info) -> None:
        if len(self.prune_kept) != info.depth or len(self.merge_kept) != info.depth:
            raise UserError(f"method.rates has {len(self.prune_kept)} layers; this model has {info.depth}")
        n = info.num_tokens
        for layer, (p, m) in enumerate(zip(self.prune_kept, self.merge_kept)):
            if not info.prefix_tokens + 1 <= m <= p or p > info.num_tokens:
                raise UserError(f"method.rates layer {layer}: need prefix+1 <= merge_kept ({m}) <= "
                                f"prune_kept ({p}) <= {info.num_tokens} tokens")
            n = min(n, p, m)

    def rates(self) -> dict[str, Any]:
        return {"prune_kept": self.prune_kept, "merge_kept": self.merge_kept}

    def planned_tokens(self, info):
        if not self.prune_kept:
            return None
        out, n = [], info.num_tokens
        for p, m in zip(self.prune_kept, self.merge_kept):
            after = min(n, p, m)
            out.append((n, after))
            n = after
        return out

    # ---------------------------------------------------------------------- inference
    def _sort_by_importance(self, x, attn, st):
        p = st.prefix
        order = attn.cls_attention()[:, p:].argsort(dim=1, descending=True) + p
        prefix_idx = torch.arange(p, device=x.device).expand(x.shape[0], p)
        index = torch.cat([prefix_idx, order], dim=1)
        st.gather(index)
        if st.size is None:
            st.size = torch.ones(x.shape[0], x.shape[1], 1, device=x.device)
        return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))

    def after_attention(self, index, x, attn, st):
        if self.searching:
            return self._search_step(index, x, attn, st)
        prune, merge = self.prune_kept[index], self.merge_kept[index]
        if prune >= x.shape[1] and merge >= x.shape[1]:
            return x
        x = self._sort_by_importance(x, attn, st)
        if prune < x.shape[1]:
            x = x[:, :prune]
            st.gather(torch.arange(prune, device=x.device).expand(x.shape[0], prune))
        if merge < x.shape[1]:
            x, st.size, idx = _similarity_merge(x, st.size, merge, st.prefix, keep_tail=False)
            if st.source is not None:
                src = st.source
                st.source = src[:, :merge].scatter_reduce(
                    1, idx.expand(-1, -1, src.shape[-1]), src[:, merge:], reduce="amax")
        return x

    # ------------------------------------------------------------------------- search
    def start_search(self, info) -> None:
        patches = info.num_patches
        self.prune_dist = nn.ModuleList()
        self.merge_dist = nn.ModuleList()
        for layer in range(info.depth):
            # The first layer is never compressed (as in the paper): a single candidate, all kept.
            g = patches + 1 if layer == 0 else self.granularity
            self.prune_dist.append(RateDistribution(patches, g))
            self.merge_dist.append(RateDistribution(patches, g))
        self.searching = True

    def before_block(self, index, x, st):
        if self.searching and index == 0:
            st.scratch.update(mask=torch.ones(x.shape[0], x.shape[1], device=x.device), prune=[], merge=[])
        return x

    def attend(self, index, q, k, v, st, parts):
        if not self.searching:
            return super().attend(index, q, k, v, st, parts)
        # Softmax with a token policy: masked tokens are cut out of every row but still see
        # themselves (a row of zeros would be undefined); the mask carries the gradient.
        logits = (q @ k.transpose(-1, -2)) * parts.scale
        if self.prop_attn and st.size is not None:
            logits = logits + st.size.log()[:, None, None, :, 0]
        mask = st.scratch["mask"]
        n = mask.shape[1]
        policy = mask[:, None, None, :]
        eye = torch.eye(n, device=q.device)[None, None]
        policy = policy + (1.0 - policy) * eye
        weights = (logits - logits.amax(-1, keepdim=True)).float().exp() * policy
        eps = 1e-6
        weights = (weights + eps / n) / (weights.sum(-1, keepdim=True) + eps)
        st.scratch["cls_attn"] = weights[:, :, 0].mean(1)
        return weights.to(v.dtype) @ v

    def _search_step(self, index, x, attn, st):
        p = st.prefix
        b, n, _ = x.shape
        mask = st.scratch["mask"]
        order = st.scratch["cls_attn"][:, p:].argsort(dim=1, descending=True) + p
        prefix_idx = torch.arange(p, device=x.device).expand(b, p)
        idx = torch.cat([prefix_idx, order], dim=1)
        x = x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
        st.size = st.sizes(x).gather(1, idx[..., None])
        mask = mask.gather(1, idx)
        last = int(mask[0].sum().round().item())
        prune_kept = self.prune_dist[index].expected_kept() + p
        st.scratch["prune"].append(prune_kept)
        if prune_kept.item() < last:
            keep = _straight_through_mask(self.prune_dist[index].survival(n, p), int(prune_kept.item()), last)
            mask = mask * keep[None]
        mid = min(last, int(prune_kept.item()))
        merge_kept = self.merge_dist[index].expected_kept() + p
        st.scratch["merge"].append(merge_kept)
        if merge_kept.item() < mid:
            kept = int(merge_kept.item())
            merged, size, _ = _similarity_merge(x[:, :mid], st.size[:, :mid], kept, p, keep_tail=True)
            x = torch.cat([merged, x[:, mid:]], 1)
            st.size = torch.cat([size, st.size[:, mid:]], 1)
            keep = _straight_through_mask(self.merge_dist[index].survival(n, p), kept, mid)
            mask = mask * keep[None]
        st.scratch["mask"] = mask
        return x

    def expected_macs(self, info, prune: list[torch.Tensor], merge: list[torch.Tensor]) -> torch.Tensor:
        n = torch.tensor(float(info.num_tokens))
        total = torch.zeros(())
        for pk, mk in zip(prune, merge):
            total = total + attention_macs(n, info.hidden_size)
            n = _MinSTE.apply(n, pk, mk)
            total = total + mlp_macs(n, info.hidden_size, info.mlp_hidden)
        return total

    def search(self, patch, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
               log=None) -> dict[str, Any]:
        """Learn the kept counts on calibration batches (pixels, labels or None). Without labels
        the uncompressed model's own predictions are the targets."""
        info = patch.info
        cfg = {"steps": 300, "lr": 0.1, "min_lr": 0.01, "lambda_flops": 200.0, **self.search_cfg}
        self.start_search(info)
        frozen = [p for p in patch.model.parameters() if p.requires_grad]
        for p in frozen:  # the backbone is frozen: only the rate distributions learn
            p.requires_grad_(False)
        optim = torch.optim.AdamW(self.parameters(), lr=cfg["lr"], weight_decay=0.0)
        full = model_macs(info, [(info.num_tokens, info.num_tokens)] * info.depth, include_embed=False)
        history = []
        steps = int(cfg["steps"])
        batches = iter(batches)
        for step in range(steps):
            try:
                pixels, labels = next(batches)
            except StopIteration:
                raise UserError("the calibration set ran out during the DiffRate search; lower "
                                "method.search.steps or use more calibration images") from None
            if labels is None or (labels < 0).any():
                with torch.no_grad(), patch.disabled():
                    labels = info.forward(pixels).argmax(-1)
            logits = info.forward(pixels)
            st = patch.last_state
            macs = self.expected_macs(info, st.scratch["prune"], st.scratch["merge"])
            ratio = macs / full
            task = F.cross_entropy(logits.float(), labels)
            loss = task + cfg["lambda_flops"] * (ratio - self.target_flops) ** 2
            optim.zero_grad(set_to_none=True)
            loss.backward()
            lr = cfg["min_lr"] + 0.5 * (cfg["lr"] - cfg["min_lr"]) * (1 + math.cos(math.pi * step / max(1, steps)))
            for group in optim.param_groups:
                group["lr"] = lr
            optim.step()
            row = {"step": step + 1, "task_loss": task.item(), "flops_ratio": ratio.item()}
            history.append(row)
            if log is not None:
                log(row)
        self.searching = False
        for p in frozen:
            p.requires_grad_(True)
        self.prune_kept, self.merge_kept = self._final_counts(info)
        self._check_rates(info)
        return {"history": history, **self.rates()}

    def _final_counts(self, info) -> tuple[list[int], list[int]]:
        prune, merge, n = [], [], info.num_tokens
        with torch.no_grad():
            for pd, md in zip(self.prune_dist, self.merge_dist):
                pk = min(n, int(pd.expected_kept().item()) + info.prefix_tokens)
                mk = min(pk, int(md.expected_kept().item()) + info.prefix_tokens)
                prune.append(pk)
                merge.append(mk)
                n = mk
        return prune, merge

    def describe(self):
        return {"method": self.name, "target_flops": self.target_flops, **self.rates()}
