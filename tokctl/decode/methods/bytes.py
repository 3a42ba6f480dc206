"""`method=bytes`: generation one byte at a time from the model's exact next-byte distribution
(Phan et al., 2024; :mod:`tokctl.decode.byte_view`).

The prompt's end is read from its last anchor with every tokenisation it could have, so a prompt
that stops inside a word (a cursor in the middle of an identifier) is no longer out of
distribution. Greedy takes the most likely byte, sampling draws one with the run's temperature,
top-k and top-p applied to the 256 bytes and the end of text. Its speed is reported per byte
(bytes/s, model calls per byte): a byte costs at most one model call, of the few tokens since the
anchor.
"""

from __future__ import annotations

import torch

from tokctl.decode.base import DecodingMethod, Generation
from tokctl.decode.byte_view import EOS, ByteView, ContextFull, choose_byte, combine
from tokctl.decode.sampling import Settings
from tokctl.errors import UserError


class ByteDecoding(DecodingMethod):
    name = "bytes"
    unit = "bytes"
    score_mode = "exact"

    def __init__(self, prune: float = 1e-4, max_new_bytes: int | None = None):
        if not 0 <= float(prune) < 1:
            raise UserError(f"prune={prune} must be in [0, 1)")
        if max_new_bytes is not None and int(max_new_bytes) < 1:
            raise UserError(f"max_new_bytes={max_new_bytes} must be at least 1")
        self.prune = float(prune)
        self.max_new_bytes = None if max_new_bytes is None else int(max_new_bytes)
        self.bytes_made = 0

    def view(self, settings: Settings) -> ByteView:
        return ByteView(self.target, self.target.tokenizer, settings.eos_ids, self.prune)

    def generate(self, prompt_ids: list[int], settings: Settings,
                 generator: torch.Generator | None) -> Generation:
        view = self.view(settings)
        room = self.max_new_bytes or 8 * settings.max_new_tokens
        view.start(prompt_ids, "exact", room=room + 64)
        out, reason = generate_bytes([view], [1.0], "mixture", settings, generator,
                                     self.max_new_bytes)
        self.bytes_made += len(out)
        return as_generation(view.vocab, out, reason, view.calls, settings)

    def run_info(self):
        return {"prune": self.prune, "max_new_bytes": self.max_new_bytes}


def generate_bytes(views: list[ByteView], weights: list[float], how: str, settings: Settings,
                   generator, max_new_bytes: int | None) -> tuple[bytes, str]:
    """Bytes drawn one at a time from the combined distribution of ``views`` until the end of
    text, the byte limit (or, without one, ``max_new_tokens`` tokens of the first view's
    tokenizer) or the context's end; the bytes and why it stopped."""
    out = bytearray()
    vocab = views[0].vocab
    while True:
        try:
            dist = combine([v.distribution() for v in views], weights, how)
        except ContextFull:
            return bytes(out), "context"
        b = choose_byte(dist, settings.sampling, generator)
        if b == EOS:
            return bytes(out), "eos"
        out.append(b)
        if max_new_bytes is not None:
            if len(out) >= max_new_bytes:
                return bytes(out), "length"
        elif len(vocab.encode(out.decode("utf-8", errors="ignore"))) >= settings.max_new_tokens:
            return bytes(out), "length"
        for v in views:
            v.append(b)


def as_generation(vocab, out: bytes, reason: str, calls: int, settings: Settings) -> Generation:
    """A byte method's result: its bytes, and their canonical tokens for the token-level figures."""
    tokens = vocab.encode(out.decode("utf-8", errors="replace"))
    if reason == "eos" and settings.eos_ids:
        tokens.append(min(settings.eos_ids))
    return Generation(tokens=tokens, steps=calls, finish_reason=reason, new_bytes=out,
                      extra={"model_calls": calls})
