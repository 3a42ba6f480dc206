"""`method=hybrid`: one draft tree merging prompt-lookup continuations with recycled candidates.

Retrieval first, as SAM-Decoding does: when the text so far ends in an n-gram seen before, the
tokens that followed it form a chain from the root, scored by how often copied chains have been
accepted at each depth; the adjacency-matrix candidates of Token Recycling fill in the rest of the
tree, merging with the chain where they agree. Repetitive text (code edits, summaries that quote)
then gets long chains, the rest recycled branches; the best nodes by estimated acceptance are kept,
as many as this hardware's verify cost pays for.
"""

from __future__ import annotations

from typing import Any

from tokctl.decode.methods.lookup import MatchStats, find_continuation
from tokctl.decode.methods.recycling import TokenRecycling
from tokctl.decode.speculative import Draft
from tokctl.decode.trees import CandidateTree


class Hybrid(TokenRecycling):
    name = "hybrid"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, max_chain: int = 16,
                 budget: Any = "auto", max_nodes: int = 80, **recycling: Any):
        super().__init__(budget=budget, max_nodes=max_nodes, **recycling)
        self.max_ngram, self.min_ngram, self.max_chain = int(max_ngram), int(min_ngram), int(max_chain)
        self.chain_stats = MatchStats(self.max_chain, self.max_ngram)
        self._chain_nodes: list[int] = []
        self._matched = 0

    def snapshot(self):
        return (super().snapshot(), self.chain_stats.state())

    def restore(self, snap) -> None:
        super().restore(snap[0])
        self.chain_stats.load(snap[1])

    def propose(self, tokens, settings, generator) -> Draft:
        tree = CandidateTree()
        chain, self._matched = find_continuation(tokens, self.max_ngram, self.min_ngram,
                                                 self.max_chain)
        chain_nodes = []
        scores = self.chain_stats.cumulative(self._matched) if chain else []
        for t, score in zip(chain, scores):
            chain_nodes.append(tree.add(t, chain_nodes[-1] if chain_nodes else -1, score))
        self.add_recycled(tree, tokens[-1])
        n = self.choose_size(tree.ranked_scores())
        kept = set(sorted(tree.ranked()[:n]))
        draft = tree.select(n)
        # Where the chain's nodes landed in the draft, to learn how deep chains get accepted.
        order = sorted(kept)
        self._chain_nodes = [order.index(i) for i in chain_nodes if i in kept]
        return draft

    def observe(self, tokens, draft, logits, path, bonus) -> None:
        super().observe(tokens, draft, logits, path, bonus)
        if self._chain_nodes:
            on_chain = 0
            for node, chain_node in zip(path, self._chain_nodes):
                if node != chain_node:
                    break
                on_chain += 1
            self.chain_stats.update(self._matched, len(self._chain_nodes), on_chain)

    def run_info(self) -> dict:
        return {**super().run_info(),
                "chain_acceptance_by_match": self.chain_stats.summary()}
