"""`method=draft`: speculative decoding with a separate draft model (Leviathan et al., 2023;
Chen et al., 2023), including a draft with another tokenizer.

The draft proposes a chain autoregressively; the target verifies it in one pass. With a shared
vocabulary and temperature > 0 the chain carries the draft's probabilities and is verified by
speculative sampling (accept with min(1, p/q), resample from the normalised residual). With a
different tokenizer the draft works through text (decode, re-encode), as universal assisted
generation does, and its guesses are checked against the target's own choices, which is lossless
too. The chain length is chosen each step from how deep chains have been accepted, the measured
verify cost, and the draft's cost per token.
"""

from __future__ import annotations

from typing import Any

from tokctl.decode.budget import SizedDrafts, cached_cost
from tokctl.decode.drafter import DraftModel, require_draft
from tokctl.decode.methods.lookup import DepthStats
from tokctl.decode.sampling import sample
from tokctl.decode.speculative import DETERMINISTIC, IID, Draft, SpeculativeMethod
from tokctl.errors import UserError


class DraftChain(SpeculativeMethod, SizedDrafts):
    name = "draft"
    needs_draft = True
    PROBE_EVERY = 8  # steps between one-token probes while the budget says not to draft

    def __init__(self, max_tokens: int = 8, budget: Any = "auto", draft_backend: str = "auto"):
        super().__init__()
        if int(max_tokens) < 1:
            raise UserError(f"max_tokens={max_tokens} must be at least 1")
        self.init_budget(budget, int(max_tokens))
        self.depth_stats = DepthStats(self.max_nodes, prior_first=0.6, prior_decay=0.8)
        self.draft_backend = draft_backend
        self.drafter: DraftModel | None = None
        self._drafted = 0
        self._steps = 0

    def setup(self, target, loaded) -> None:
        super().setup(target, loaded)
        self.drafter = DraftModel(require_draft(self.name, loaded), loaded.tokenizer,
                                  self.draft_backend)
        # an image-token prior's draft has no tokenizer and no end of sequence
        self.eos = set(filter(None, [getattr(self.drafter.tokenizer, "eos_token_id", None)]))
        self.setup_budget(target, loaded)
        if self.budget == "auto":
            self.draft_node_cost = cached_cost(self.drafter.loaded.source, self.drafter.target,
                                               max_n=4, refresh=getattr(target, "remeasure_cost",
                                                                        False))(1)

    def snapshot(self):
        return self.depth_stats.state()

    def restore(self, snap) -> None:
        self.depth_stats.load(snap)
        self.chosen_sizes, self.predicted_gain = [], []

    def propose(self, tokens, settings, generator) -> Draft:
        d = self.drafter
        gamma = self.choose_size(self.depth_stats.cumulative())
        self._steps += 1
        if gamma == 0:
            # Drafting does not pay at the acceptance seen so far: skip the draft model (it
            # catches up on the skipped tokens in one forward later), but probe now and then, or
            # the acceptance estimate could never rise again.
            if self._steps % self.PROBE_EVERY:
                self._drafted = 0
                return Draft(scheme=DETERMINISTIC)
            gamma = 1
        logits = d.sync(d.to_draft(tokens))
        sampled = not settings.sampling.greedy and d.shared_vocab
        draft = Draft(scheme=IID if sampled else DETERMINISTIC)
        guesses: list[int] = []
        for i in range(gamma):
            if sampled:
                q = d.draft_probs(logits, settings.sampling, self.target.vocab_size)
                token = int(sample(q, generator))
                draft.q[i - 1] = q
                draft.draws[i - 1] = [token]
            else:
                token = int(logits.argmax())
            guesses.append(token)
            if token in self.eos:
                break
            if i + 1 < gamma:  # the last guess needs no draft forward
                logits = d.step(token)
        if d.shared_vocab:
            chain = guesses
        else:
            chain = d.to_target(tokens, guesses)[: self.max_nodes]
        for i, t in enumerate(chain):
            draft.add(t, i - 1)
        self._drafted = len(chain)
        return draft

    def observe(self, tokens, draft, logits, path, bonus) -> None:
        if self._drafted:
            self.depth_stats.update(self._drafted, len(path))

    def run_info(self) -> dict:
        d = self.drafter
        return {"draft_model": d.loaded.source if d else None,
                "shared_vocabulary": d.shared_vocab if d else None,
                "depth_acceptance": [round(x, 4) for x in self.depth_stats.cumulative()],
                **self.budget_info()}
