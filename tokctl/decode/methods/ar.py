"""`method=ar`: plain autoregressive decoding in a tight loop over the target's KV cache.

The baseline every other method is measured against: one target forward pass per new token,
greedy or sampled (temperature, top-k, top-p) exactly as the shared sampling module defines it.
"""

from __future__ import annotations

import torch

from tokctl.decode.base import DecodingMethod, Generation, append_tokens
from tokctl.decode.sampling import Settings, choose


def decode_loop(target, logits: torch.Tensor, settings: Settings,
                generator: torch.Generator | None, room: int,
                first_allowed: torch.Tensor | None = None) -> Generation:
    """Tokens one at a time from the logits after a prefilled prompt; ``first_allowed`` limits the
    first token to those ids (token healing)."""
    out: list[int] = []
    while True:
        if first_allowed is not None and not out:
            masked = torch.full_like(logits, float("-inf"))
            masked[first_allowed] = logits[first_allowed]
            logits = masked
        token = choose(logits, settings.sampling, generator)
        reason = append_tokens(out, [token], settings)
        if reason is None and len(out) >= room:
            reason = "context"
        if reason:
            break
        logits = target.step(token)
    return Generation(tokens=out, steps=target.forward_calls, finish_reason=reason,
                      accepted_per_step=[1] * target.forward_calls)


class Autoregressive(DecodingMethod):
    name = "ar"

    def generate(self, prompt_ids: list[int], settings: Settings,
                 generator: torch.Generator | None) -> Generation:
        target = self.target
        room = target.max_positions - len(prompt_ids)
        logits = target.prefill(prompt_ids, capacity=len(prompt_ids) + settings.max_new_tokens + 1)
        return decode_loop(target, logits, settings, generator, room)
