"""`method=heal`: token healing, the usual fix for a prompt that ends inside a token.

The prompt's last token is taken back and the first new token must start with its bytes (it
may be that token again, or a longer one that completes the word); then plain autoregressive
decoding. The output is what follows the prompt's bytes: the first token's bytes less the ones
it re-spells. A prompt of one token, or one ending in a special token, is decoded as it is.
"""

from __future__ import annotations

import torch

from tokctl.decode.base import DecodingMethod, Generation
from tokctl.decode.byte_vocab import token_bytes
from tokctl.decode.methods.ar import decode_loop
from tokctl.decode.sampling import Settings


class TokenHealing(DecodingMethod):
    name = "heal"
    score_mode = "heal"

    def __init__(self):
        self.healed = 0

    def generate(self, prompt_ids: list[int], settings: Settings,
                 generator: torch.Generator | None) -> Generation:
        target = self.target
        vocab = token_bytes(target.tokenizer, target.vocab_size)
        ids = list(prompt_ids)
        tail = vocab.bytes[ids[-1]] if len(ids) > 1 else b""
        context = ids[:-1] if tail else ids
        allowed = None
        if tail:
            lo, hi = vocab.prefix_range(tail)
            allowed = vocab.sorted_ids[lo:hi].to(target.device)
            self.healed += 1
        logits = target.prefill(context, capacity=len(context) + settings.max_new_tokens + 1)
        gen = decode_loop(target, logits, settings, generator, target.max_positions - len(context),
                          first_allowed=allowed)
        gen.new_bytes = b"".join(vocab.bytes[t] for t in gen.tokens)[len(tail):]
        return gen

    def run_info(self):
        return {"prompts_healed": self.healed}
