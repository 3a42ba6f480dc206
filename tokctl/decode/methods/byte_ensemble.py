"""`method=byte_ensemble`: two models with different tokenizers generating together, byte by byte.

Token-level ensembles need a shared vocabulary; next-byte distributions (Phan et al., 2024; see
:mod:`tokctl.decode.byte_view`) are over the same 257 outcomes for every model. Each step mixes
the target's and the draft model's (``draft_model=``) distributions, as a mixture (weighted mean)
or a product of experts (weighted geometric mean), and both views move on by the chosen byte.
The draft model reads the prompt as text (the target's tokens decoded, re-encoded with its own
tokenizer). ``weight`` is the target's share: 1 or 0 give one model alone through the same path.
"""

from __future__ import annotations

import torch

from tokctl.decode.base import DecodingMethod, Generation
from tokctl.decode.byte_view import ByteView, loglik_combined
from tokctl.decode.drafter import require_draft
from tokctl.decode.methods.bytes import as_generation, generate_bytes
from tokctl.decode.sampling import Settings
from tokctl.decode.target import make_target
from tokctl.errors import UserError

COMBINE = ("mixture", "product")


class ByteEnsemble(DecodingMethod):
    name = "byte_ensemble"
    needs_draft = True
    unit = "bytes"

    def __init__(self, combine: str = "mixture", weight: float = 0.5, prune: float = 1e-4,
                 max_new_bytes: int | None = None):
        if combine not in COMBINE:
            raise UserError(f"combine={combine} is not one of {', '.join(COMBINE)}")
        if not 0 <= float(weight) <= 1:
            raise UserError(f"weight={weight} must be in [0, 1]")
        if not 0 <= float(prune) < 1:
            raise UserError(f"prune={prune} must be in [0, 1)")
        self.combine = combine
        self.weight = float(weight)
        self.prune = float(prune)
        self.max_new_bytes = None if max_new_bytes is None else int(max_new_bytes)

    def setup(self, target, loaded) -> None:
        super().setup(target, loaded)
        self.other = require_draft(self.name, loaded)
        self.other_target = make_target(self.other.model, self.other.tokenizer, "auto")
        ids = getattr(self.other.model.generation_config, "eos_token_id", None)
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        self.other_eos = frozenset(ids + ([self.other.tokenizer.eos_token_id]
                                          if self.other.tokenizer.eos_token_id is not None else []))

    def views(self, prompt_ids: list[int], settings: Settings, room: int,
              prune: float | None = None) -> list[ByteView]:
        prune = self.prune if prune is None else prune
        mine = ByteView(self.target, self.target.tokenizer, settings.eos_ids, prune)
        mine.start(prompt_ids, "exact", room=room)
        tok = self.other.tokenizer
        text = self.target.tokenizer.decode(prompt_ids, skip_special_tokens=True)
        theirs = ByteView(self.other_target, tok, self.other_eos, prune)
        theirs.start(list(tok(text, add_special_tokens=True)["input_ids"]), "exact", room=room)
        return [mine, theirs]

    def generate(self, prompt_ids: list[int], settings: Settings,
                 generator: torch.Generator | None) -> Generation:
        room = (self.max_new_bytes or 8 * settings.max_new_tokens) + 64
        views = self.views(prompt_ids, settings, room)
        out, reason = generate_bytes(views, [self.weight, 1 - self.weight], self.combine,
                                     settings, generator, self.max_new_bytes)
        gen = as_generation(views[0].vocab, out, reason, views[0].calls + views[1].calls, settings)
        gen.extra.update(calls_target=views[0].calls, calls_other=views[1].calls)
        return gen

    def score(self, prompt_ids: list[int], continuation: bytes, settings: Settings) -> float:
        views = self.views(prompt_ids, settings, len(continuation) + 64, self.score_prune)
        return loglik_combined(views, [self.weight, 1 - self.weight], self.combine, continuation)

    def run_info(self):
        return {"combine": self.combine, "weight": self.weight, "prune": self.prune,
                "other_model": self.other.source if getattr(self, "other", None) else None}
