"""`method=kangaroo`: Kangaroo's self-speculation with double early exit (Liu et al., 2024).

The draft is the target itself, cut short: its first L layers (shared weights), a small trained
adapter (one attention sublayer and a norm, :mod:`tokctl.decode.kangaroo`) and its own LM head.
It drafts a chain token by token and stops early, the paper's second exit, as soon as the draft's
top probability falls below ``threshold`` (the token that fell below is still proposed; what is
saved is the next draft forward), or after ``max_tokens``. The target verifies the chain in one
pass on the shared engine: greedy drafts against its argmax (exact), and at temperature > 0
tokens drawn from the draft's distribution by speculative sampling (lossless).

``adapter=none`` drafts with the plain early exit at ``exit_layer`` (the model's final norm and
head, no adapter: ``self:N``) under the same rule, the untrained yardstick at the same depth.

Not done here: the paper also lets the target resume from the draft's layer-L hidden states, so
the first L layers run once per token; this draft keeps its own cache for them, and the target
verifies with all its layers.
"""

from __future__ import annotations

import torch

from tokctl.decode import kangaroo as kg
from tokctl.decode.drafter import DraftModel
from tokctl.decode.sampling import Sampling, probs
from tokctl.decode.speculative import DETERMINISTIC, IID, Draft, SpeculativeMethod
from tokctl.decode.target import FastTarget
from tokctl.errors import UserError
from tokctl.models import fast_llama


def without_adapter(value) -> bool:
    return str(value).lower() in ("none", "null", "false")


def exit_drafter(loaded, adapter_value, exit_layer: int | None, method: str,
                 key: str = "method.exit_layer") -> tuple[DraftModel, dict]:
    """The draft at one early exit of the target: its first layers (own KV cache), the adapter
    (``adapter_value``: auto, a run folder, a file; ``none``: the model's own final norm at
    ``exit_layer``), and the target's head. Returns the drafter and its run_info entries.
    Bad input is refused in one line."""
    model = loaded.model
    if not fast_llama.supports(model):
        raise UserError(f"method={method} needs a Llama-architecture model, not "
                        f"{model.config.model_type}")
    n_layers = model.config.num_hidden_layers
    adapter = None
    if without_adapter(adapter_value):
        if exit_layer is None:
            raise UserError(f"method.adapter=none drafts with the plain early exit: set "
                            f"{key}=N")
        info = {"adapter": None}
    else:
        path = kg.resolve_adapter(adapter_value, exit_layer)
        adapter, meta = kg.load_adapter(path, model)
        if exit_layer is not None and exit_layer != adapter.exit_layer:
            raise UserError(f"{key}={exit_layer}, but the adapter {path} was trained at exit "
                            f"layer {adapter.exit_layer}")
        exit_layer = adapter.exit_layer
        info = {"adapter": str(path), "adapter_info": meta}
    if not 1 <= exit_layer < n_layers:
        raise UserError(f"{key}={exit_layer}: choose it from 1 to {n_layers - 1} (the model "
                        f"has {n_layers} layers)")
    info["exit_layer"] = exit_layer
    draft_target = FastTarget(model, loaded.tokenizer, exit_layer=exit_layer, adapter=adapter)
    drafter = DraftModel(loaded, loaded.tokenizer, target=draft_target)
    return drafter, info


def draft_cost(target, draft_target) -> float | None:
    """One draft forward over one target forward (one token each), both timed now, one after the
    other (not from the cost-table cache: a table measured hours earlier under another load is
    not comparable with one measured now)."""
    from tokctl.decode.budget import measure

    try:
        t = measure(target, max_n=1, rounds=5)(1)
        d = measure(draft_target, max_n=1, rounds=5)(1)
    except Exception:  # noqa: BLE001 - a figure, not worth failing a run for
        return None
    return d / t

class Kangaroo(SpeculativeMethod):
    name = "kangaroo"

    def __init__(self, adapter: str | None = "auto", threshold: float = 0.6, max_tokens: int = 6,
                 exit_layer: int | None = None):
        super().__init__()
        threshold = float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise UserError(f"method.threshold={threshold}: a probability, from 0 to 1")
        if int(max_tokens) < 1:
            raise UserError(f"method.max_tokens={max_tokens} must be at least 1")
        self.adapter_value = adapter
        self.threshold, self.max_tokens = threshold, int(max_tokens)
        self.exit_layer = None if exit_layer is None else int(exit_layer)
        self.drafter: DraftModel | None = None
        self.info: dict = {}
        self._drafted: list[int] = []  # draft length per step
        self._accepted: list[int] = []  # accepted draft tokens per step
        self._draft_calls = 0
        self._stopped_early = 0

    def setup(self, target, loaded) -> None:
        super().setup(target, loaded)
        self.drafter, self.info = exit_drafter(
            loaded, self.adapter_value, self.exit_layer, self.name)
        self.eos = set(filter(None, [loaded.tokenizer.eos_token_id]))

    def snapshot(self):
        return None

    def restore(self, snap) -> None:  # the warm-up's steps do not count
        self._drafted, self._accepted = [], []
        self._draft_calls = self._stopped_early = 0

    def propose(self, tokens, settings, generator) -> Draft:
        d = self.drafter
        logits = d.sync(tokens)
        self._draft_calls += 1
        sampled = not settings.sampling.greedy
        draft = Draft(scheme=IID if sampled else DETERMINISTIC)
        unit = Sampling(temperature=1.0)
        for i in range(self.max_tokens):
            if sampled:
                q = d.draft_probs(logits, settings.sampling, self.target.vocab_size)
                token = int(torch.multinomial(q, 1, generator=generator))
                draft.q[i - 1] = q
                draft.draws[i - 1] = [token]
                confidence = float(q.max())
            else:
                p = probs(logits, unit)
                token = int(p.argmax())
                confidence = float(p[token])
            draft.add(token, i - 1)
            if token in self.eos or i + 1 == self.max_tokens:
                break
            if confidence < self.threshold:  # the second early exit: stop drafting here
                self._stopped_early += 1
                break
            logits = d.step(token)
            self._draft_calls += 1
        self._drafted.append(len(draft))
        return draft

    def observe(self, tokens, draft, logits, path, bonus) -> None:
        self._accepted.append(len(path))

    def _draft_cost(self) -> float | None:
        return draft_cost(self.target, self.drafter.target)

    def run_info(self) -> dict:
        steps = len(self._drafted)
        first = [a >= 1 for a, n in zip(self._accepted, self._drafted) if n >= 1]
        # Acceptance of the draft's k-th token given the ones before it were accepted.
        by_depth = []
        for k in range(1, self.max_tokens + 1):
            tried = [a for a, n in zip(self._accepted, self._drafted) if n >= k and a >= k - 1]
            if not tried:
                break
            by_depth.append(round(sum(a >= k for a in tried) / len(tried), 4))
        return {**self.info, "threshold": self.threshold, "max_tokens": self.max_tokens,
                "steps": steps,
                "mean_draft_tokens": round(sum(self._drafted) / steps, 4) if steps else None,
                "mean_accepted_draft_tokens": round(sum(self._accepted) / steps, 4)
                if steps else None,
                "depth1_acceptance": round(sum(first) / len(first), 4) if first else None,
                "acceptance_by_depth": by_depth,
                "draft_forwards_per_step": round(self._draft_calls / steps, 4) if steps else None,
                "stopped_by_threshold": round(self._stopped_early / steps, 4) if steps else None,
                "draft_cost": self._draft_cost_value}

    _draft_cost_value = None

    def finish(self) -> None:
        if self.drafter is not None and self._draft_cost_value is None:
            cost = self._draft_cost()
            self._draft_cost_value = None if cost is None else round(cost, 4)
