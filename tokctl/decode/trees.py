"""Candidate trees scored by estimated acceptance probability, cut to the best n nodes.

Drafting methods add candidate nodes with a score, their estimated probability of being accepted
(the probability that the whole path from the root to them is accepted). Scores never increase
from parent to child, so the n best nodes always form a tree; :func:`tokctl.decode.budget.best_size`
picks n for the hardware.
"""

from __future__ import annotations

from tokctl.decode.speculative import DETERMINISTIC, Draft


class CandidateTree:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.scores: list[float] = []
        self._index: dict[tuple[int, int], int] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int, score: float) -> int:
        """Add (or, if that token is already a child of ``parent``, re-score) a node; returns its
        index. A node's score is capped by its parent's."""
        if parent >= 0:
            score = min(score, self.scores[parent])
        key = (parent, int(token))
        if key in self._index:
            i = self._index[key]
            self.scores[i] = max(self.scores[i], score)
            return i
        self._index[key] = len(self.tokens)
        self.tokens.append(int(token))
        self.parents.append(parent)
        self.scores.append(float(score))
        return len(self.tokens) - 1

    def ranked(self) -> list[int]:
        """Node indices best first; ties keep insertion order, so parents precede children."""
        return sorted(range(len(self.tokens)), key=lambda i: (-self.scores[i], i))

    def ranked_scores(self) -> list[float]:
        return [self.scores[i] for i in self.ranked()]

    def select(self, n: int, scheme: str = DETERMINISTIC) -> Draft:
        """The best ``n`` nodes as a draft (parents before children)."""
        chosen = sorted(self.ranked()[:n])  # insertion order keeps parents first
        remap = {old: new for new, old in enumerate(chosen)}
        draft = Draft(scheme=scheme)
        for old in chosen:
            p = self.parents[old]
            draft.add(self.tokens[old], remap[p] if p >= 0 else -1)
        return draft

