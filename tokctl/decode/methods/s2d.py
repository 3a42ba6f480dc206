"""`method=s2d`: nested early exits with per-exit confidence stops (after S2D, Kavehzadeh et al. 2024).

S2D's draft is one stack with several exits at increasing depths (sub-models sorted by depth),
and each draft token comes from the shallowest exit sure enough of it: the smallest sub-model
is tried first and a deeper one only when its top probability is below that exit's threshold.
Here the stack is the target itself: each exit is the target's first L_k layers, Kangaroo's
adapter trained at that depth and the shared head (:func:`kangaroo.exit_drafter`). When even the
deepest exit is below its threshold, its token is still proposed and drafting stops (Kangaroo's
second exit). Verification is the shared engine's: greedy output identical to ``ar``'s, and at
temperature > 0 each token is drawn from the distribution of the exit that proposed it, which the
speculative sampler then corrects (the choice of exit depends only on the draft's own state, so
the proposal is a proper distribution per position and the result stays the target's law).

Not the paper's compute sharing: each exit keeps its own KV cache of its own first L_k layers and
catches up with the chain lazily, in one forward, only when it is consulted; so a deeper exit
re-runs the shallow layers rather than continuing from the shallow exit's hidden state. The
run reports how often each exit was used and what each costs against a target step.
"""

from __future__ import annotations

import torch

from tokctl.decode.methods.kangaroo import Kangaroo, draft_cost, exit_drafter
from tokctl.decode.sampling import Sampling, probs
from tokctl.decode.speculative import DETERMINISTIC, IID, Draft
from tokctl.errors import UserError


def _as_list(value, key: str) -> list:
    if isinstance(value, (str, int, float)):
        return [value]
    try:
        return list(value)
    except TypeError:
        raise UserError(f"method.{key}={value}: give a list, one entry per exit") from None


class S2D(Kangaroo):
    name = "s2d"

    def __init__(self, exit_layers=(4, 8), adapters="auto", thresholds=(0.8, 0.6),
                 max_tokens: int = 6):
        layers = [int(x) for x in _as_list(exit_layers, "exit_layers")]
        if not layers:
            raise UserError("method.exit_layers is empty: give at least one exit layer")
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise UserError(f"method.exit_layers={layers}: the exits must increase in depth "
                            f"(shallowest first)")
        thresholds = [float(t) for t in _as_list(thresholds, "thresholds")]
        if len(thresholds) != len(layers):
            raise UserError(f"method.thresholds has {len(thresholds)} entries for "
                            f"{len(layers)} exits (method.exit_layers={layers}): one per exit")
        for t in thresholds:
            if not 0.0 <= t <= 1.0:
                raise UserError(f"method.thresholds: {t} is not a probability from 0 to 1")
        adapters = [adapters] * len(layers) if isinstance(adapters, str) or adapters is None \
            else _as_list(adapters, "adapters")
        if len(adapters) != len(layers):
            raise UserError(f"method.adapters has {len(adapters)} entries for {len(layers)} "
                            f"exits: one per exit (or one word, auto or none, for all)")
        super().__init__(adapter=None, threshold=thresholds[-1], max_tokens=max_tokens)
        self.exit_layers, self.thresholds, self.adapter_values = layers, thresholds, adapters
        self.drafters: list = []
        self._use = [0] * len(layers)  # draft tokens taken from each exit
        self._calls = [0] * len(layers)  # forwards (syncs) of each exit

    def setup(self, target, loaded) -> None:
        super(Kangaroo, self).setup(target, loaded)
        self.drafters, infos = [], []
        for layer, value in zip(self.exit_layers, self.adapter_values):
            drafter, info = exit_drafter(loaded, value, layer, self.name,
                                         key="method.exit_layers")
            self.drafters.append(drafter)
            infos.append(info)
        self.drafter = self.drafters[-1]
        self.info = {"exits": infos}
        self.eos = set(filter(None, [loaded.tokenizer.eos_token_id]))

    def restore(self, snap) -> None:
        super().restore(snap)
        self._use = [0] * len(self.exit_layers)
        self._calls = [0] * len(self.exit_layers)

    def propose(self, tokens, settings, generator) -> Draft:
        sampled = not settings.sampling.greedy
        draft = Draft(scheme=IID if sampled else DETERMINISTIC)
        unit = Sampling(temperature=1.0)
        context = list(tokens)
        last = len(self.drafters) - 1
        for i in range(self.max_tokens):
            for k, d in enumerate(self.drafters):
                # Each exit catches up with the chain only when it is consulted.
                logits = d.sync(context)
                self._calls[k] += 1
                self._draft_calls += 1
                q = d.draft_probs(logits, settings.sampling, self.target.vocab_size) \
                    if sampled else probs(logits, unit)
                confidence = float(q.max())
                if confidence >= self.thresholds[k] or k == last:
                    break
            if sampled:
                token = int(torch.multinomial(q, 1, generator=generator))
                draft.q[i - 1] = q
                draft.draws[i - 1] = [token]
            else:
                token = int(q.argmax())
            draft.add(token, i - 1)
            self._use[k] += 1
            if token in self.eos or i + 1 == self.max_tokens:
                break
            if confidence < self.thresholds[k]:  # no exit is sure enough: stop drafting here
                self._stopped_early += 1
                break
            context.append(token)
        self._drafted.append(len(draft))
        return draft

    def run_info(self) -> dict:
        info = super().run_info()
        for key in ("threshold", "draft_cost"):
            info.pop(key, None)
        steps = max(1, info["steps"])
        used = max(1, sum(self._use))
        return {**info, "exit_layers": self.exit_layers, "thresholds": self.thresholds,
                "exit_use": [round(u / used, 4) for u in self._use],
                "forwards_per_step_by_exit": [round(c / steps, 4) for c in self._calls],
                "draft_cost_by_exit": self._costs,
                # The drafting's cost per step in target forwards (one token each).
                "draft_cost_per_step": None if self._costs is None or None in self._costs else
                round(sum(c * x for c, x in zip(self._calls, self._costs)) / steps, 4)}

    _costs = None

    def finish(self) -> None:
        if self.drafters and self._costs is None:
            costs = [draft_cost(self.target, d.target) for d in self.drafters]
            self._costs = [None if c is None else round(c, 4) for c in costs]
