"""A draft model beside the target: its own KV cache, kept in step with the committed text.

With the target's tokenizer, the draft sees the same token ids and can hand the verifier its
probabilities. With another tokenizer (SmolLM2 drafting for Gemma 3), the draft works on the text:
the target's tokens are decoded and re-encoded for the draft, and the draft's guesses are decoded
and re-encoded for the target (as Hugging Face's universal assisted generation does); such drafts
carry no probabilities the target could use, so they are verified against the target's own choices.
"""

from __future__ import annotations

import torch

from tokctl.decode.sampling import Sampling, probs
from tokctl.decode.target import make_target
from tokctl.errors import UserError


def same_vocabulary(a, b) -> bool:
    if a is b:
        return True
    if len(a) != len(b):
        return False
    return a.get_vocab() == b.get_vocab()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class DraftModel:
    def __init__(self, loaded_draft, target_tokenizer, backend: str = "auto", target=None):
        """``target``: the draft's forward, when it is not the loaded model's own (Kangaroo's
        early exit with its adapter)."""
        self.loaded = loaded_draft
        own = getattr(loaded_draft, "decode_target", None)  # a draft with its own target (a prior)
        self.target = target or (own() if own else make_target(
            loaded_draft.model, loaded_draft.tokenizer, backend,
            exit_layer=loaded_draft.info.get("exit_layer")))
        self.tokenizer = loaded_draft.tokenizer
        self.target_tokenizer = target_tokenizer
        self.shared_vocab = same_vocabulary(self.tokenizer, target_tokenizer)
        self.cached: list[int] = []  # the draft-side ids whose KV the draft cache holds
        self._text_prompt_len = 0

    # --- keeping the cache in step -----------------------------------------------------------
    def sync(self, context: list[int]) -> torch.Tensor:
        """Bring the draft cache to ``context`` (draft-side ids); the logits after its last token."""
        keep = _common_prefix(self.cached, context)
        keep = min(keep, len(context) - 1)  # the last token is re-run for its logits
        if keep <= 0 or self.target.length == 0:
            logits = self.target.prefill(context, capacity=len(context) + 512)
        else:
            if keep < self.target.length:
                self.target.truncate(keep)
            new = context[keep:]
            if len(new) == 1:  # the bonus token after a rejection: a plain step
                logits = self.target.step(new[0])
            else:
                logits = self.target.forward(new)[-1]
                self.target.commit(list(range(len(new))))
        self.cached = list(context)
        return logits

    def step(self, token: int) -> torch.Tensor:
        """Append one token to the draft's sequence; its logits."""
        logits = self.target.step(token)
        self.cached.append(int(token))
        return logits

    def tree_logits(self, tokens: list[int], parents: list[int]) -> torch.Tensor:
        """Logits at every node of a tree hanging below the synced context (left uncommitted)."""
        logits = self.target.forward(tokens, parents)
        self.target.commit([])
        return logits

    # --- bridging tokenizers -----------------------------------------------------------------
    def to_draft(self, target_ids: list[int]) -> list[int]:
        if self.shared_vocab:
            return list(target_ids)
        text = self.target_tokenizer.decode(target_ids, skip_special_tokens=False)
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def to_target(self, target_context: list[int], draft_tokens: list[int]) -> list[int]:
        """The draft's guessed continuation as target token ids. The last few target tokens are
        re-encoded together with the guess so that merges across the boundary come out as the
        target tokenizer would make them."""
        if self.shared_vocab:
            return list(draft_tokens)
        guess = self.tokenizer.decode(draft_tokens, skip_special_tokens=True)
        if not guess:
            return []
        tail = target_context[-4:]
        tail_text = self.target_tokenizer.decode(tail, skip_special_tokens=False)
        ids = self.target_tokenizer(tail_text + guess, add_special_tokens=False)["input_ids"]
        if ids[: len(tail)] == tail:
            return ids[len(tail):]
        return self.target_tokenizer(guess, add_special_tokens=False)["input_ids"]

    def draft_probs(self, logits: torch.Tensor, sampling: Sampling, vocab: int) -> torch.Tensor:
        """The draft's distribution over the target's vocabulary (shared-vocabulary drafts)."""
        p = probs(logits, sampling)
        if p.shape[-1] > vocab:
            p = p[..., :vocab]
            p = p / p.sum(-1, keepdim=True)
        elif p.shape[-1] < vocab:
            p = torch.nn.functional.pad(p, (0, vocab - p.shape[-1]))
        return p


def require_draft(method_name: str, loaded) -> object:
    draft = getattr(loaded, "draft", None)
    if draft is None:
        raise UserError(f"method={method_name} needs a draft model: add draft_model=NAME "
                        f"(a model config such as smollm2-135m, a folder, a .gguf file or a hub id)")
    return draft


def shared_vocab_drafter(method_name: str, loaded, backend: str) -> DraftModel:
    """The draft of a method whose verification needs the draft's probabilities over the
    target's own vocabulary."""
    drafter = DraftModel(require_draft(method_name, loaded), loaded.tokenizer, backend)
    if not drafter.shared_vocab:
        raise UserError(f"method={method_name} needs a draft model with the target's vocabulary "
                        f"(or draft_model=self:N); method=draft takes one with another tokenizer")
    return drafter
