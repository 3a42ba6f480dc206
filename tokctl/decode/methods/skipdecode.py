"""`method=skipdecode`: SkipDecode's token-level early exit for batches (Del Corro et al., 2023).

Each new token runs only the top layers of the model: how many decreases linearly with its
position in the generation, from ``max_layers`` for the first generated token to ``min_layers``
at ``span`` tokens (default: max_new_tokens), the same for every sequence of a batch. The layers
skipped are the bottom ones (the token's embedding goes straight into the first layer run), so a
later token, which runs fewer layers, finds every key and value it attends to already cached by
the tokens before it: nothing is recomputed. The prompt runs all layers. It changes the output
(lossy, untrained here): its figures are quality ones (agreement with `ar`, the full model's
perplexity, the math prompts' final numbers).
"""

from __future__ import annotations

import math

from tokctl.decode.base import DecodingMethod
from tokctl.errors import UserError


class SkipDecode(DecodingMethod):
    name = "skipdecode"
    batched = True

    def __init__(self, max_layers: int | None = None, min_layers: int = 20,
                 span: int | None = None):
        super().__init__()
        self.max_layers = None if max_layers is None else int(max_layers)
        self.min_layers, self.span = int(min_layers), None if span is None else int(span)
        self.top = self.max_layers  # all of the model's layers once setup() knows how many
        if self.span is not None and self.span < 1:
            raise UserError(f"method.span={span} must be at least 1")

    def setup(self, target, loaded) -> None:
        super().setup(target, loaded)
        n = loaded.model.config.num_hidden_layers
        top = n if self.max_layers is None else self.max_layers
        if not 1 <= self.min_layers <= top <= n:
            raise UserError(f"method.min_layers={self.min_layers}, method.max_layers={top}: need "
                            f"1 <= min_layers <= max_layers <= {n} (the model's layers)")
        self.num_layers, self.top = n, top

    def layers_at(self, t: int, max_new_tokens: int) -> int:
        """Layers run for the t-th new token (t >= 1): linear from max_layers at t = 1 to
        min_layers at t = span, then min_layers; never increasing."""
        span = self.span or max_new_tokens
        frac = min(1.0, (t - 1) / max(1, span - 1))
        return max(self.min_layers, math.ceil(self.top - frac * (self.top - self.min_layers)))

    def first_layer_at(self, max_new_tokens: int):
        return lambda t: self.num_layers - self.layers_at(t, max_new_tokens)

    def run_info(self) -> dict:
        return {"max_layers": self.top, "min_layers": self.min_layers,
                "span": self.span or "max_new_tokens"}
