"""`method=spectr`: SpecTr (Sun et al., 2023): k i.i.d. draft sequences, k-sequential selection.

The draft model samples ``num_drafts`` independent continuations of ``length`` tokens. They share
prefixes, so they are grown as one tree level by level (the drafts through a node draw their next
tokens i.i.d. from the draft distribution there) and run through the target once. At each node
SpecTr's k-sequential selection picks a token: draft i is accepted with probability
min(1, p(x_i) / (rho q(x_i))), rho in [1, k] chosen as small as losslessness allows, and if no draft
is accepted the token comes from the matching residual distribution. The output keeps the target's
distribution; with more drafts, more of them survive each level. Greedy decoding degenerates to
one chain of the draft's top tokens.
"""

from __future__ import annotations

import torch

from tokctl.decode.methods.rsd import RecursiveSpeculative
from tokctl.decode.speculative import KSEQ
from tokctl.errors import UserError


class SpecTr(RecursiveSpeculative):
    name = "spectr"

    def __init__(self, num_drafts: int = 4, length: int = 4, draft_backend: str = "auto"):
        if int(num_drafts) < 1 or int(length) < 1:
            raise UserError("spectr: num_drafts and length must be at least 1")
        self.num_drafts = int(num_drafts)
        super().__init__(branching=[1] * int(length), draft_backend=draft_backend)

    @property
    def scheme(self) -> str:
        return KSEQ

    def draws_per_node(self, depth: int, multiplicity: int) -> int:
        # Greedy: every draft is the same chain. Sampling: the drafts through this node.
        return multiplicity if multiplicity else self.num_drafts

    def children(self, q, count: int, settings, generator) -> list[int]:
        if settings.sampling.greedy:
            return q.topk(1).indices.tolist()
        return torch.multinomial(q, count, replacement=True, generator=generator).tolist()

    def run_info(self) -> dict:
        return {"draft_model": self.drafter.loaded.source, "num_drafts": self.num_drafts,
                "length": len(self.branching)}
