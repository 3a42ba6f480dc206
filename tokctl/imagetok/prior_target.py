"""The token prior (prior.py) as a decoding-engine target, so that `ar`, the drafting methods and
LANTERN (decode/methods/*.py) run on image tokens through the same engine as on text.

Why an adapter and not a prior retrained as a Hugging Face Llama: the shipped prior
(weights/default.prior.pt) is a TokenPrior, and the engine needs only three operations of a
target (prefill, a tree forward after the committed prefix, commit): about sixty lines over the
prior's own blocks, against retraining (CPU hours here) and a second prior format.

A sequence is ``[BOS] + code ids`` (BOS is id ``vocab``, which the prior embeds but never
predicts). The cache holds one key/value pair per block; a tree's pending entries are appended
and :meth:`_keep` keeps the committed path. Input position i uses the prior's position embedding
i, as in :meth:`TokenPrior.forward`.
"""

from __future__ import annotations

import torch

from tokctl.decode.target import Target, tree_positions_and_mask
from tokctl.imagetok.prior import TokenPrior, guided_logits
from tokctl.kernels.tree_attention import allowed_mask


class PriorTarget(Target):
    backend = "prior"

    def __init__(self, prior: TokenPrior, source: str = "prior", guidance: float = 1.0):
        # BOS + max_tokens - 1 inputs predict max_tokens ids; the last id is never an input.
        super().__init__(prior, None, vocab_size=prior.vocab, max_positions=prior.max_tokens + 1)
        self.source = source
        self.bos = prior.vocab
        # Classifier-free guidance for a conditional prior's sequences (prior.guided_logits): every
        # forward also runs the sequence started by BOS instead of its cluster, as a second row.
        self.guidance = float(guidance)
        self.caches: list[list] = []
        # The prior's forward is ~1 ms, so each step's Python and tensor-building work counts:
        # the modules are looked up once, and the one-token step (ar, a draft model's chain)
        # builds no mask and gathers no cache entries (see _run and _keep).
        self._embed, self._pos, self._norm, self._head = prior.embed, prior.pos, prior.norm, prior.head
        self._blocks = list(prior.blocks)

    def _reset(self, capacity: int) -> None:
        self.caches = [[] for _ in self._blocks]

    @torch.no_grad()
    def _run(self, tokens, parents, last_only):
        n, last = tokens.numel(), self.model.max_tokens - 1
        if parents is None and self.length + n <= last + 1:
            pos, mask = self._pos[self.length:self.length + n], None  # a chain: positions in order
            if n > 1:
                mask = allowed_mask(self.length, None, n, device=self.device)[None, None]
            # one new row may attend to every cached key: no mask at all (the same attention)
        else:
            if parents is None:
                depth, tree = torch.arange(n, device=self.device), None
            else:
                depth, tree = tree_positions_and_mask(torch.tensor(parents, device=self.device))
            mask = allowed_mask(self.length, tree, n, device=self.device)[None, None]
            # Positions past the prior's length occur only in the verify-cost measurement's long
            # random sequences (budget.measure); the cost of a step does not depend on them.
            pos = self._pos[(self.length + depth).clamp(max=last)]
        x = (self._embed(tokens) + pos)[None]
        if self.guidance != 1:  # row 1: the unconditional sequence (a cluster's start id -> BOS)
            x = torch.cat([x, (self._embed(tokens.clamp(max=self.bos)) + pos)[None]])
        for block, cache in zip(self._blocks, self.caches):
            x = block(x, cache, mask)
        if last_only:
            x = x[:, -1:]
        logits = self._head(self._norm(x))
        return logits[0] if self.guidance == 1 else guided_logits(logits[0], logits[1], self.guidance)

    def _keep(self, keep):
        if keep == list(range(len(keep))):
            # the path is a prefix of the pending entries (every chain, ar's one token): cut the
            # rest off instead of gathering
            self._truncate(self.length + len(keep))
            return
        index = torch.cat([torch.arange(self.length, device=self.device),
                           torch.tensor(keep, dtype=torch.long, device=self.device) + self.length])
        for cache in self.caches:
            cache[:] = [cache[0].index_select(2, index), cache[1].index_select(2, index)]

    def _truncate(self, length: int) -> None:
        for cache in self.caches:
            if cache and cache[0].shape[2] != length:
                cache[:] = [cache[0][:, :, :length], cache[1][:, :, :length]]


class PriorSource:
    """What a method's ``setup(target, loaded)`` reads of a loaded model: the name that keys the
    verify-cost cache (budget.py), no text tokenizer, and the draft (a smaller prior as a
    PriorSource of its own, for `method=draft`), if any."""

    def __init__(self, source: str, model: TokenPrior | None = None, draft=None):
        self.source, self.tokenizer, self.draft = source, None, draft
        self.model, self.info = model, {}

    def decode_target(self) -> PriorTarget:
        """The draft's own forward (drafter.DraftModel asks a draft that is not a Hugging Face
        model for it)."""
        return PriorTarget(self.model, self.source)
