"""`method=rsd`: Recursive Speculative Decoding (Jeon et al., 2024), constant branching (RSD-C).

The draft tree's children are drawn *without replacement* from the draft distribution, with the
Gumbel-top-k trick (perturb log q with Gumbel noise, keep the b largest), ``branching[d]`` children
per node at depth d. Verification is recursive rejection sampling: try the children in the order
they were drawn, accept x with probability min(1, p(x)/q(x)); on rejection p becomes the normalised
residual max(p - q, 0) and x leaves q. Sampling without replacement means no two siblings are the
same token, so the tree wastes no verification on duplicates, and the output keeps the target's
distribution. Greedy decoding uses the draft's top-b tokens instead.
"""

from __future__ import annotations

import torch

from tokctl.decode.drafter import shared_vocab_drafter
from tokctl.decode.sampling import Sampling
from tokctl.decode.speculative import DETERMINISTIC, WITHOUT_REPLACEMENT, Draft, SpeculativeMethod
from tokctl.errors import UserError


def gumbel_top_k(q: torch.Tensor, k: int, generator) -> list[int]:
    """k distinct tokens drawn without replacement from q, in draw order."""
    support = int((q > 0).sum())
    k = min(k, support)
    u = torch.rand(q.shape, generator=generator, dtype=torch.float64).clamp_min(1e-300)
    keys = torch.log(q.double()) - torch.log(-torch.log(u))
    return keys.topk(k).indices.tolist()


class RecursiveSpeculative(SpeculativeMethod):
    name = "rsd"
    needs_draft = True

    def __init__(self, branching: list[int] | tuple[int, ...] = (2, 2, 1, 1),
                 draft_backend: str = "auto"):
        super().__init__()
        self.branching = [int(b) for b in branching]
        if not self.branching or min(self.branching) < 1:
            raise UserError(f"branching={list(branching)} needs at least one depth, each >= 1")
        self.draft_backend = draft_backend

    def setup(self, target, loaded) -> None:
        super().setup(target, loaded)
        self.drafter = shared_vocab_drafter(self.name, loaded, self.draft_backend)

    def children(self, q, count: int, settings, generator) -> list[int]:
        if settings.sampling.greedy:
            return q.topk(min(count, int((q > 0).sum()))).indices.tolist()
        return gumbel_top_k(q, count, generator)

    @property
    def scheme(self) -> str:
        return WITHOUT_REPLACEMENT

    def draws_per_node(self, depth: int, multiplicity: int) -> int:
        return self.branching[depth]

    def propose(self, tokens, settings, generator) -> Draft:
        d = self.drafter
        vocab = self.target.vocab_size
        greedy = settings.sampling.greedy
        draft = Draft(scheme=DETERMINISTIC if greedy else self.scheme)
        s = settings.sampling if not greedy else Sampling(temperature=1.0)
        qs = {-1: d.draft_probs(d.sync(tokens), s, vocab)}
        frontier = {-1: 0}  # node -> how many drafts pass through it (SpecTr); 0 at the root
        depths = len(self.branching)
        for depth in range(depths):
            new_frontier: dict[int, int] = {}
            for node, mult in frontier.items():
                q = qs[node]
                draws = self.children(q, self.draws_per_node(depth, mult), settings, generator)
                if not greedy:
                    draft.q[node] = q
                    draft.draws[node] = draws
                counts: dict[int, int] = {}
                for t in draws:
                    counts[t] = counts.get(t, 0) + 1
                for t, c in counts.items():
                    new_frontier[draft.add(t, node)] = c
            frontier = new_frontier
            if depth + 1 < depths and frontier:
                logits = d.tree_logits(draft.tokens, draft.parents)
                for node in frontier:
                    qs[node] = d.draft_probs(logits[node], s, vocab)
        return draft

    def run_info(self) -> dict:
        return {"draft_model": self.drafter.loaded.source, "branching": self.branching,
                "tree_nodes": self._tree_nodes()}

    def _tree_nodes(self) -> int:
        total, width = 0, 1
        for b in self.branching:
            width *= b
            total += width
        return total
