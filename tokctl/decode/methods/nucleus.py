"""`method=nucleus`: k independent samples with `method=ar`'s loop, one after the other.

The baseline Superposed Decoding is measured against: k drafts for k times the cost of one.
Sampling follows the run's temperature / top_p / top_k; the drafts differ because each draws from
the run's generator in turn.
"""

from __future__ import annotations

import torch

from tokctl.decode.base import DecodingMethod, Generation
from tokctl.decode.methods.ar import Autoregressive
from tokctl.decode.sampling import Settings
from tokctl.errors import UserError


class NucleusSamples(DecodingMethod):
    name = "nucleus"

    def __init__(self, k: int = 3):
        if int(k) < 1:
            raise UserError(f"k={k}: the number of samples must be at least 1")
        self.k = int(k)
        self.ar = Autoregressive()

    def setup(self, target, loaded) -> None:
        super().setup(target, loaded)
        self.ar.setup(target, loaded)

    def generate(self, prompt_ids: list[int], settings: Settings,
                 generator: torch.Generator | None) -> Generation:
        gens = [self.ar.generate(prompt_ids, settings, generator) for _ in range(self.k)]
        return Generation(tokens=gens[0].tokens, steps=sum(g.steps for g in gens),
                          finish_reason=gens[0].finish_reason,
                          accepted_per_step=[1] * sum(g.steps for g in gens),
                          extra={"drafts": [g.tokens for g in gens]})

    def run_info(self):
        return {"k": self.k}
