"""What a decoding method is, and what one generation returns.

Methods never time themselves: the job measures every method the same way around ``generate``.
A method's config (conf/decode/method/<name>.yaml) instantiates its class through ``_target_``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tokctl.decode.sampling import Settings


@dataclass
class Generation:
    tokens: list[int]  # new tokens only
    steps: int  # target forward passes, prefill included
    finish_reason: str  # "eos" | "length" | "context"
    accepted_per_step: list[int] = field(default_factory=list)  # new tokens each step produced
    extra: dict[str, Any] = field(default_factory=dict)
    # What follows the prompt, as bytes, where it is not simply the tokens' bytes: a byte-level
    # method's output, or token healing's (its first token re-spells the prompt's last one).
    new_bytes: bytes | None = None


class DecodingMethod:
    """Subclasses set ``name`` and implement ``generate``; ``setup`` gets the shared target."""

    name = "method"
    needs_draft = False  # True for methods that need draft_model=
    unit = "tokens"  # what the method emits one at a time: "tokens", or "bytes" (speed per byte)
    # How the byte-level view reads the prompt when a reference continuation is scored (data=cut):
    # "pinned", the prompt's tokens as they are (every token-level method), "heal" or "exact".
    score_mode = "pinned"
    # The byte-level view's pruning tolerance for that score, one for all methods: a text's
    # unlikely bytes need it tighter than generation does (1e-4 can move a naive score on a
    # mid-token cut by 0.2 nats per byte; 0, exact, costs a full-vocabulary check per call).
    score_prune = 1e-6

    def setup(self, target, loaded) -> None:  # noqa: ARG002 - loaded: models.loading.LoadedModel
        self.target = target

    def generate(self, prompt_ids: list[int], settings: Settings,
                 generator: torch.Generator | None) -> Generation:
        raise NotImplementedError

    def score(self, prompt_ids: list[int], continuation: bytes, settings: Settings) -> float:
        """Log-likelihood (nats) of ``continuation`` following the prompt, under the distribution
        this method generates from, marginalised over tokenisations (:mod:`byte_view`)."""
        from tokctl.decode.byte_view import ByteView, loglik

        view = ByteView(self.target, self.target.tokenizer, settings.eos_ids,
                        self.score_prune)
        view.start(prompt_ids, self.score_mode, room=len(continuation) + 64)
        return loglik(view, continuation)

    def snapshot(self) -> Any:
        """State that learns across prompts (e.g. a recycling matrix), saved before the warm-up
        so that the warm-up does not teach the method the first prompt."""
        return None

    def restore(self, snap: Any) -> None:
        """Put back what :meth:`snapshot` returned."""

    def finish(self) -> None:
        """The run is over (or interrupted): persist anything worth keeping."""

    def run_info(self) -> dict[str, Any]:
        """Facts about this method's run worth recording (a chosen tree budget, say)."""
        return {}


def append_tokens(out: list[int], new: list[int], settings: Settings) -> str | None:
    """Append one step's tokens, stopping at EOS or max_new_tokens; returns why it stopped."""
    for t in new:
        out.append(int(t))
        if t in settings.eos_ids:
            return "eos"
        if len(out) >= settings.max_new_tokens:
            return "length"
    return None
