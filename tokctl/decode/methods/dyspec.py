"""`method=dyspec`: DySpec's dynamic draft tree (Xiong et al., 2024).

The draft probability of a token predicts well whether the target will accept it, so the tree is
grown greedily: every candidate (a node's next token under the draft) is scored by the product of
draft probabilities along its path, and the best candidates are added first. tokctl expands the
``width`` best candidates per draft forward (the whole tree so far runs through the draft model in
one pass with a tree mask), for at most ``rounds`` passes or ``max_nodes`` nodes, then keeps the
best nodes this hardware's verify cost pays for. Children are the draft's top tokens (not samples),
so verification compares them with the target's own choices: exact when greedy and lossless when
sampling.
"""

from __future__ import annotations

import heapq
from typing import Any

from tokctl.decode.budget import SizedDrafts
from tokctl.decode.drafter import shared_vocab_drafter
from tokctl.decode.sampling import Sampling
from tokctl.decode.speculative import Draft, SpeculativeMethod
from tokctl.decode.trees import CandidateTree
from tokctl.errors import UserError


class DySpec(SpeculativeMethod, SizedDrafts):
    name = "dyspec"
    needs_draft = True

    def __init__(self, max_nodes: int = 32, width: int = 4, rounds: int = 6, children: int = 4,
                 budget: Any = "auto", draft_backend: str = "auto"):
        super().__init__()
        if min(int(width), int(rounds), int(children), int(max_nodes)) < 1:
            raise UserError("dyspec: width, rounds, children and max_nodes must be at least 1")
        self.width, self.rounds, self.children = int(width), int(rounds), int(children)
        self.init_budget(budget, int(max_nodes))
        self.draft_backend = draft_backend

    def setup(self, target, loaded) -> None:
        super().setup(target, loaded)
        self.drafter = shared_vocab_drafter(self.name, loaded, self.draft_backend)
        self.setup_budget(target, loaded)

    def _scores(self, logits, settings):
        # Greedy decoding still ranks candidates by a real distribution (temperature 1).
        s = settings.sampling if not settings.sampling.greedy else Sampling(temperature=1.0)
        return self.drafter.draft_probs(logits, s, self.target.vocab_size)

    def _push(self, heap, q, parent: int, parent_score: float) -> None:
        top = q.topk(self.children)
        for p, t in zip(top.values.tolist(), top.indices.tolist()):
            if p > 0:
                heapq.heappush(heap, (-parent_score * p, len(heap), parent, t))

    def propose(self, tokens, settings, generator) -> Draft:
        d = self.drafter
        tree = CandidateTree()
        heap: list = []
        self._push(heap, self._scores(d.sync(tokens), settings), -1, 1.0)
        for r in range(self.rounds):
            added = []
            while heap and len(added) < self.width and len(tree) < self.max_nodes:
                neg, _, parent, token = heapq.heappop(heap)
                added.append(tree.add(token, parent, -neg))
            if not added or len(tree) >= self.max_nodes or r + 1 == self.rounds:
                break
            logits = d.tree_logits(tree.tokens, tree.parents)
            for node in added:
                self._push(heap, self._scores(logits[node], settings), node, tree.scores[node])
        return tree.select(self.choose_size(tree.ranked_scores()))

    def run_info(self) -> dict:
        return {"draft_model": self.drafter.loaded.source, "width": self.width,
                "rounds": self.rounds, **self.budget_info()}
