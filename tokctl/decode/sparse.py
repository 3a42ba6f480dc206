"""What the sparse decoding methods share: `method=ar`'s loop with a per-layer attention policy
installed on the lean forward (:attr:`FastLlama.layer_attention`).

The KV cache stays whole: a policy changes which cached positions a one-token step reads, never
what is stored. Blocks of more than one token (the prefill) always run full attention. A policy
picks, per decode step and layer, full attention (and may remember its scores) or attention over
per-kv-head position lists (:func:`tokctl.kernels.gathered_attention.gathered_attention`). It
counts the positions each layer read, so a run reports the fraction of the cache each layer read.
"""

from __future__ import annotations

import math

import torch

from tokctl.decode.base import Generation
from tokctl.decode.methods.ar import Autoregressive
from tokctl.decode.sampling import Settings
from tokctl.errors import UserError
from tokctl.kernels.gathered_attention import gathered_attention


def full_with_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Full attention for one query ([H, 1, D] over [Hkv, T, D]) and its softmax weights summed
    over each kv head's group of query heads ([Hkv, T]): how much the group read each position."""
    heads, _, dim = q.shape
    kv_heads = k.shape[0]
    qg = q.view(kv_heads, heads // kv_heads, dim)
    p = torch.softmax(torch.einsum("hgd,htd->hgt", qg, k).float() / math.sqrt(dim), dim=-1)
    out = torch.einsum("hgt,htd->hgd", p.to(v.dtype), v).reshape(heads, 1, dim)
    return out, p.sum(1)


def top_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[Hkv, k] the k positions each kv head attended to most."""
    return scores.topk(min(k, scores.shape[1]), dim=1).indices


class Policy:
    """Per-layer attention for one-token steps; subclasses implement :meth:`attend`."""

    def __init__(self, num_layers: int, dense):
        self.num_layers = num_layers
        self.dense = dense  # the engine's full attention (its kernel dispatcher)
        self.reset()

    def reset(self) -> None:
        self.read = [0.0] * self.num_layers  # fraction of the window read, summed over steps
        self.steps = 0

    def __call__(self, layer: int, q, k, v, allowed):
        if q.shape[1] != 1:
            return self.dense(q, k, v, allowed)
        if layer == 0:
            self.steps += 1
        out, positions = self.attend(layer, q, k, v)
        self.read[layer] += min(positions, k.shape[1]) / k.shape[1]
        return out

    def attend(self, layer: int, q, k, v) -> tuple[torch.Tensor, int]:
        """Output [H, 1, D] and how many cached positions per kv head it read."""
        raise NotImplementedError

    def full(self, q, k, v):
        return self.dense(q, k, v, torch.ones(1, k.shape[1], dtype=torch.bool, device=k.device))

    def gathered(self, q, k, v, index: torch.Tensor):
        return gathered_attention(q[:, 0], k, v, index)[:, None], int((index[0] >= 0).sum())

    def cache_read(self) -> list[float]:
        return [r / self.steps if self.steps else 1.0 for r in self.read]


class SparseDecoding(Autoregressive):
    """`method=ar`'s loop with a :class:`Policy` installed for the duration of a generation."""

    budget_key = "top_k"  # the config key a too-large budget is reported under

    def setup(self, target, loaded) -> None:
        super().setup(target, loaded)
        if getattr(target, "backend", None) != "fast":
            raise UserError(f"method={self.name} needs the lean Llama forward (model.backend=fast, "
                            f"Llama-architecture models)")
        if target.compiled or target.exact:
            raise UserError(f"method={self.name} runs eager steps: set compile=false and "
                            f"exact=false")
        self.policy = self.make_policy(target.fast)

    def make_policy(self, fast) -> Policy:
        raise NotImplementedError

    def _set_top_k(self, top_k) -> None:
        if int(top_k) < 1:
            raise UserError(f"method.top_k={top_k} must be at least 1")
        self.top_k = int(top_k)

    def budget(self) -> int:
        """How many cached positions a sparse step reads (each method's ``top_k``)."""
        return self.top_k

    def generate(self, prompt_ids: list[int], settings: Settings,
                 generator: torch.Generator | None) -> Generation:
        if self.budget() >= len(prompt_ids):
            raise UserError(f"method.{self.budget_key}={self.budget()} is not below the prompt's "
                            f"{len(prompt_ids)} tokens: nothing would be left out; lower it")
        fast = self.target.fast
        self.policy.reset()
        fast.layer_attention = self.policy
        try:
            gen = super().generate(prompt_ids, settings, generator)
        finally:
            fast.layer_attention = None
        gen.extra["cache_read"] = [round(r, 4) for r in self.policy.cache_read()]
        return gen
