"""Sizing draft trees for the hardware at hand.

A tree that pays off on a GPU loses on a CPU: there a forward pass over 64 tokens costs several
times one token, while on a GPU it costs about the same. So instead of a fixed tree, tokctl
measures what a target forward of n tokens costs on the current device, dtype and thread count
(once, cached per model), and each step keeps the n best draft nodes that maximise

    expected tokens per step / cost(n + 1)        (the +1 is the root token)

where the expected tokens are 1 (the bonus token) plus the acceptance probabilities of the nodes
kept. With no draft at all the step is plain autoregressive decoding, so a method sized this way
should not fall below the baseline by more than its own overhead.
"""

from __future__ import annotations

import hashlib
import json
from bisect import bisect_left
from pathlib import Path
from typing import Callable, Sequence

import torch

from tokctl.errors import UserError
from tokctl.measure import median, round_robin

GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96)


class VerifyCost:
    """Seconds per target forward of n tokens, linearly interpolated between measured sizes."""

    def __init__(self, table: dict[int, float], source: str = "measured"):
        if not table:
            raise ValueError("empty cost table")
        self.sizes = sorted(int(n) for n in table)
        self.seconds = [float(table[n]) for n in self.sizes]
        self.source = source

    def __call__(self, n: int) -> float:
        sizes, secs = self.sizes, self.seconds
        if n <= sizes[0]:
            return secs[0]
        if n >= sizes[-1]:  # extrapolate with the last slope
            if len(sizes) == 1:
                return secs[0] * n / sizes[0]
            slope = (secs[-1] - secs[-2]) / (sizes[-1] - sizes[-2])
            return secs[-1] + slope * (n - sizes[-1])
        i = bisect_left(sizes, n)
        if sizes[i] == n:
            return secs[i]
        f = (n - sizes[i - 1]) / (sizes[i] - sizes[i - 1])
        return secs[i - 1] + f * (secs[i] - secs[i - 1])

    def relative(self) -> dict[int, float]:
        return {n: s / self.seconds[0] for n, s in zip(self.sizes, self.seconds)}

    def to_json(self) -> dict:
        return {"seconds": dict(zip(map(str, self.sizes), self.seconds)), "source": self.source}


def measure(target, max_n: int = 96, prefix: int = 160, rounds: int = 3) -> VerifyCost:
    """Time target forwards of each grid size, round-robin over sizes so drift hits all alike;
    the median of ``rounds`` per size after one warm-up round (:mod:`tokctl.measure`)."""
    sizes = [n for n in GRID if n < max_n] + [min(n for n in GRID if n >= min(max_n, GRID[-1]))]
    gen = torch.Generator().manual_seed(0)
    vocab = min(target.vocab_size, 1000)
    prompt = torch.randint(10, vocab, (prefix,), generator=gen).tolist()
    target.prefill(prompt, capacity=prefix + max(sizes) + 8)

    def verify(n: int):
        toks = torch.randint(10, vocab, (n,), generator=gen).tolist()
        # A bushy two-level tree: the mask path is exercised, as in real verification.
        parents = [-1 if i < max(1, n // 4) else (i % max(1, n // 4)) for i in range(n)]
        return lambda: target.forward(toks, parents)

    times = round_robin({n: verify(n) for n in sizes}, rounds, warmup=1,
                         device=target.device, after=lambda n: target.commit([]))
    table = {n: median(ts) for n, ts in times.items()}
    # A larger forward never costs less: smooth out noise so the budget search is well posed.
    running = 0.0
    for n in sizes:
        running = max(running, table[n])
        table[n] = running
    return VerifyCost(table)


def engine_variant(target) -> str:
    """How the target runs its steps, as the cost table's key sees it: eager or compiled, exact,
    the weight format (int8, prepacked bf16)."""
    parts = ["compiled" if getattr(target, "compiled", False) else "eager"]
    if getattr(target, "exact", False):
        parts.append("exact")
    quant = getattr(target, "quant", None)
    if quant:
        parts.append(str(quant))
    return "+".join(parts)


def cost_key(model_source: str, target) -> str:
    threads = torch.get_num_threads()
    raw = f"{model_source}|{target.backend}|{target.device}|{target.dtype}|{threads}|{torch.__version__}"
    # A compiled step, a batch-invariant (exact) one and each weight format cost differently.
    variant = engine_variant(target)
    if variant != "eager":
        raw += f"|{variant}"
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def cached_cost(model_source: str, target, max_n: int = 96, refresh: bool = False) -> VerifyCost:
    """The cost table for this model, backend, device, dtype and thread count: read from the
    cache, or measured (a few seconds) and stored."""
    from tokctl.models.loading import cache_dir
    from tokctl.runs import atomic_write_json

    path = Path(cache_dir()) / "verify_cost" / f"{cost_key(model_source, target)}.json"
    if path.is_file() and not refresh:
        try:
            data = json.loads(path.read_text())
            table = {int(k): float(v) for k, v in data["seconds"].items()}
            if max(table) >= min(max_n, GRID[-1]):
                return VerifyCost(table, source=f"cache:{path}")
        except (OSError, ValueError, KeyError):
            pass
    from tokctl.console import step

    with step(f"measuring the cost of verifying 1..{min(max_n, GRID[-1])} draft tokens on this "
              f"device, dtype and thread count", f"about 10 s on an idle 2-core CPU, once: then "
              f"cached in {path.parent}"):
        cost = measure(target, max_n=max_n)
    atomic_write_json(path, {**cost.to_json(), "model": model_source, "backend": target.backend,
                             "engine": engine_variant(target),
                             "device": str(target.device), "dtype": str(target.dtype),
                             "threads": torch.get_num_threads()})
    cost.source = f"measured:{path}"
    return cost


def best_size(scores: Sequence[float], cost: Callable[[int], float],
              per_node: float = 0.0) -> tuple[int, float]:
    """How many of the best-first node ``scores`` (acceptance probabilities, non-increasing) to
    verify: the n maximising (1 + sum(scores[:n])) / (cost(n + 1) + n * per_node), where
    ``per_node`` is what drafting each node costs (a draft model's step; 0 for free drafts).
    Returns (n, expected speedup over one-token steps)."""
    base = 1.0 / cost(1)
    best_n, best_rate, total = 0, base, 1.0
    for n, s in enumerate(scores, 1):
        total += s
        rate = total / (cost(n + 1) + n * per_node)
        if rate > best_rate:
            best_n, best_rate = n, rate
    return best_n, best_rate / base


class SizedDrafts:
    """Mixed into a speculative method: ``budget`` is "auto" (sized for the hardware with the
    measured cost table) or a fixed number of draft nodes. Records every size it chose."""

    def init_budget(self, budget, max_nodes: int) -> None:
        if budget != "auto":
            try:
                budget = int(budget)
            except (TypeError, ValueError):
                raise UserError(f"budget={budget!r} must be 'auto' or a number of draft nodes") from None
            if budget < 0:
                raise UserError(f"budget={budget} must be >= 0")
        self.budget = budget
        self.max_nodes = int(max_nodes)
        self.cost: VerifyCost | None = None
        self.chosen_sizes: list[int] = []
        self.predicted_gain: list[float] = []
        self.draft_node_cost = 0.0  # seconds of drafting per node (draft-model chains)

    def setup_budget(self, target, loaded) -> None:
        if self.budget == "auto":
            self.cost = cached_cost(loaded.source, target, max_n=self.max_nodes + 1,
                                    refresh=getattr(target, "remeasure_cost", False))

    def choose_size(self, ranked_scores: Sequence[float]) -> int:
        scores = list(ranked_scores)[: self.max_nodes]
        if self.budget == "auto":
            n, gain = best_size(scores, self.cost, self.draft_node_cost)
            self.predicted_gain.append(gain)
        else:
            n = min(int(self.budget), len(scores))
        self.chosen_sizes.append(n)
        return n

    def budget_info(self) -> dict:
        sizes = self.chosen_sizes
        info = {"budget": self.budget, "max_nodes": self.max_nodes,
                "mean_draft_nodes": sum(sizes) / len(sizes) if sizes else None,
                "draft_nodes_hist": _hist(sizes)}
        if self.draft_node_cost:
            info["draft_step_cost_relative"] = round(self.draft_node_cost / self.cost(1), 3)
        if self.cost is not None:
            info["verify_cost_relative"] = {str(k): round(v, 3)
                                            for k, v in self.cost.relative().items()}
            info["verify_cost_source"] = self.cost.source
            if self.predicted_gain:
                info["predicted_step_gain_mean"] = sum(self.predicted_gain) / len(self.predicted_gain)
        return info


def _hist(values: Sequence[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))
