"""`method=lookup`: prompt lookup decoding (Saxena, 2023).

Find the longest n-gram ending the text so far (n from ``max_ngram`` down to ``min_ngram``) that
also occurs earlier in the prompt or the output, and draft the tokens that followed it, as a chain.
The most recent earlier occurrence is used. The chain is cut to the length this hardware's verify
cost pays for, from online estimates of how often the d-th copied token is accepted.
"""

from __future__ import annotations

from typing import Any

import torch

from tokctl.decode.budget import SizedDrafts
from tokctl.decode.speculative import Draft, SpeculativeMethod
from tokctl.errors import UserError


def find_continuation(tokens: list[int] | torch.Tensor, max_ngram: int, min_ngram: int,
                      length: int) -> tuple[list[int], int]:
    """(tokens that followed the most recent earlier match of the longest suffix n-gram, n)."""
    seq = torch.as_tensor(tokens, dtype=torch.long)
    total = seq.numel()
    for n in range(min(max_ngram, total - 1), min_ngram - 1, -1):
        suffix = seq[total - n:]
        windows = seq[: total - 1].unfold(0, n, 1)  # every n-gram starting before the suffix
        hits = (windows == suffix).all(1).nonzero().flatten()
        hits = hits[hits + n < total]  # the match must have a continuation
        if hits.numel():
            start = int(hits[-1]) + n
            return seq[start: min(start + length, total)].tolist(), n
    return [], 0


class DepthStats:
    """P(the d-th token of a drafted chain is accepted), per depth, with a geometric prior."""

    def __init__(self, max_depth: int, prior_first: float = 0.5, prior_decay: float = 0.8,
                 prior_weight: float = 4.0):
        self.max_depth = max_depth
        self.prior = [prior_first * prior_decay**d for d in range(max_depth)]
        self.weight = prior_weight
        self.hits = [0.0] * max_depth
        self.trials = [0.0] * max_depth

    def update(self, drafted: int, accepted: int) -> None:
        for d in range(min(drafted, self.max_depth)):
            self.trials[d] += 1
            self.hits[d] += 1 if accepted > d else 0

    def cumulative(self) -> list[float]:
        """Estimated probability that the first d+1 tokens of a chain are all accepted."""
        return [(h + self.weight * p) / (t + self.weight)
                for h, t, p in zip(self.hits, self.trials, self.prior)]

    def state(self):
        return (list(self.hits), list(self.trials))

    def load(self, state) -> None:
        self.hits, self.trials = list(state[0]), list(state[1])


class MatchStats:
    """Chain acceptance per depth, kept apart for each matched n-gram length: a copy after a
    3-gram match is far more reliable than one after a single token."""

    def __init__(self, max_depth: int, max_ngram: int):
        self.by_n = {n: DepthStats(max_depth, prior_first=min(0.9, 0.3 + 0.15 * n))
                     for n in range(1, max_ngram + 1)}

    def cumulative(self, n: int) -> list[float]:
        return self.by_n[n].cumulative()

    def update(self, n: int, drafted: int, accepted: int) -> None:
        self.by_n[n].update(drafted, accepted)

    def state(self):
        return {n: s.state() for n, s in self.by_n.items()}

    def load(self, state) -> None:
        for n, st in state.items():
            self.by_n[n].load(st)

    def summary(self) -> dict[str, list[float]]:
        return {str(n): [round(x, 4) for x in s.cumulative()] for n, s in self.by_n.items()}


class PromptLookup(SpeculativeMethod, SizedDrafts):
    name = "lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, max_tokens: int = 10,
                 budget: Any = "auto"):
        super().__init__()
        if not 1 <= int(min_ngram) <= int(max_ngram):
            raise UserError(f"need 1 <= min_ngram ({min_ngram}) <= max_ngram ({max_ngram})")
        if int(max_tokens) < 1:
            raise UserError(f"max_tokens={max_tokens} must be at least 1")
        self.max_ngram, self.min_ngram = int(max_ngram), int(min_ngram)
        self.init_budget(budget, int(max_tokens))
        self.match_stats = MatchStats(self.max_nodes, self.max_ngram)
        self._drafted = self._matched = 0

    def setup(self, target, loaded) -> None:
        super().setup(target, loaded)
        self.setup_budget(target, loaded)

    def snapshot(self):
        return self.match_stats.state()

    def restore(self, snap) -> None:
        self.match_stats.load(snap)
        self.chosen_sizes, self.predicted_gain = [], []

    def propose(self, tokens, settings, generator) -> Draft:
        chain, matched = find_continuation(tokens, self.max_ngram, self.min_ngram, self.max_nodes)
        scores = self.match_stats.cumulative(matched)[: len(chain)] if chain else []
        n = self.choose_size(scores)
        self._drafted, self._matched = n, matched
        draft = Draft()
        for i, t in enumerate(chain[:n]):
            draft.add(t, i - 1)
        return draft

    def observe(self, tokens, draft, logits, path, bonus) -> None:
        if self._drafted:
            self.match_stats.update(self._matched, self._drafted, len(path))

    def run_info(self) -> dict:
        return {"depth_acceptance_by_match": self.match_stats.summary(), **self.budget_info()}
