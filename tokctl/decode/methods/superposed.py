"""`method=superposed`: Superposed Decoding (Shen et al., 2024): k drafts from one autoregressive pass.

After the prompt, every step feeds the model ONE input vector: the superposition of the embeddings
of the k drafts' latest tokens, weighted by the drafts' (normalised) probabilities. The model's one
next-token distribution is shared by all k drafts; its top ``candidates`` tokens (at a low
temperature, renormalised) are scored for each draft by geometric interpolation with an n-gram
model of that draft's own recent tokens,

    log p(draft d, token t) = (1 - alpha) * log p_LM(t) + alpha * log p_ngram(t | draft d),

and, as in beam search, the k best (draft, token) extensions by cumulative score become the next
drafts. A draft whose every candidate is unknown to the n-gram model keeps the LM score minus a
large ``penalty`` (the official code's fallback), so it survives only when no draft is supported.
Drafts that end in EOS leave the pool; the k returned are the best by score per token.

The cost is one forward pass of one position per step for all k drafts (the KV cache holds the
superposed inputs), plus n-gram look-ups. Drafts are deterministic: sampling settings are ignored.
Uses the model's plain Hugging Face forward (inputs_embeds + DynamicCache), not the decode engine.
"""

from __future__ import annotations

import inspect

import torch

from tokctl.decode.base import DecodingMethod, Generation
from tokctl.decode.ngram import NGramModel
from tokctl.decode.sampling import Settings
from tokctl.errors import UserError

# The paper's interpolation weights for contexts of 1..5 tokens (its p15_d3 parameters).
PAPER_WEIGHTS = (0.01, 0.04, 0.15, 0.18, 0.12)


class SuperposedDecoding(DecodingMethod):
    name = "superposed"

    def __init__(self, k: int = 3, ngram: str | None = None, alpha: float = 0.54,
                 temperature: float = 0.06, candidates: int = 9,
                 ngram_weights=PAPER_WEIGHTS, ngram_n: int | None = None, penalty: float = 200.0):
        if int(k) < 1:
            raise UserError(f"k={k}: the number of drafts must be at least 1")
        if not 0 <= float(alpha) <= 1:
            raise UserError(f"alpha={alpha} must be in [0, 1] (the n-gram model's weight)")
        if float(temperature) <= 0:
            raise UserError(f"temperature={temperature} must be > 0 (it sharpens the LM's "
                             f"distribution before the candidates are taken)")
        if int(candidates) < 1:
            raise UserError(f"candidates={candidates} must be at least 1")
        self.k = int(k)
        self.ngram_path = ngram
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        # Enough candidates that the first step (one distribution, one draft) can fill k drafts.
        self.candidates = max(int(candidates), self.k)
        self.weights = [float(w) for w in ngram_weights]
        self.ngram_n = ngram_n
        self.penalty = float(penalty)
        self.ngram: NGramModel | None = None

    def setup(self, target, loaded) -> None:
        super().setup(target, loaded)
        self.model = loaded.model
        if self.alpha > 0:
            if not self.ngram_path:
                raise UserError("method=superposed needs an n-gram model: build one with "
                                "`tokctl decode build-ngram` and pass method.ngram=RUN/ngram.json "
                                "(or method.alpha=0 for none)")
            self.ngram = NGramModel.load(self.ngram_path)
            self.ngram.check_tokenizer(loaded.tokenizer, self.ngram_path)
            n = min(self.ngram.n, int(self.ngram_n or self.ngram.n))
            if n < 2:
                raise UserError(f"method.ngram_n={self.ngram_n} must be at least 2")
            self.weights = self.weights[: n - 1]

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], settings: Settings,
                 generator: torch.Generator | None) -> Generation:
        drafts, scores, steps, reasons = superposed_decode(
            self.model, prompt_ids, k=self.k, max_new_tokens=settings.max_new_tokens,
            eos_ids=settings.eos_ids, ngram=self.ngram, weights=self.weights, alpha=self.alpha,
            temperature=self.temperature, candidates=self.candidates, penalty=self.penalty,
            max_positions=self.target.max_positions)
        return Generation(tokens=drafts[0], steps=steps, finish_reason=reasons[0],
                          accepted_per_step=[len(drafts[0])],
                          extra={"drafts": drafts, "draft_scores": scores})

    def run_info(self):
        return {"k": self.k, "alpha": self.alpha, "temperature": self.temperature,
                "candidates": self.candidates, "ngram_weights": self.weights,
                "ngram": self.ngram_path, "ngram_stats": self.ngram.stats() if self.ngram else None}


def _cache_keyword(model) -> str:
    # transformers 5 renames past_key_values= to cache=; use whichever this model takes.
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _forward(model, cache, position: int, input_ids=None, inputs_embeds=None):
    n = (input_ids if input_ids is not None else inputs_embeds).shape[1]
    positions = torch.arange(position, position + n, device=model.device)[None]
    out = model(input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=positions,
                use_cache=True, logits_to_keep=1, **{_cache_keyword(model): cache})
    return out.logits[0, -1].float()


def superposed_decode(model, prompt_ids: list[int], k: int, max_new_tokens: int,
                      eos_ids=frozenset(), ngram: NGramModel | None = None, weights=PAPER_WEIGHTS,
                      alpha: float = 0.54, temperature: float = 0.06, candidates: int = 9,
                      penalty: float = 200.0, max_positions: int | None = None):
    """k drafts for one prompt; returns (drafts, scores per token, forward passes, finish reasons)."""
    from transformers import DynamicCache

    device = model.device
    embed = model.get_input_embeddings()
    cache = DynamicCache()
    room = max_new_tokens if max_positions is None else min(max_new_tokens,
                                                             max_positions - len(prompt_ids))
    logits = _forward(model, cache, 0, input_ids=torch.tensor([prompt_ids], device=device))
    forwards = 1
    m = max(candidates, k)
    alive: list[list[int]] = [[]]  # one draft until the first step branches
    alive_lp = torch.zeros(1, dtype=torch.float64)
    finished: list[tuple[list[int], float]] = []
    for step in range(room):
        probs = torch.softmax(logits / temperature, dim=-1)
        top_p, top_i = probs.topk(m)
        top_p = (top_p / top_p.sum()).double()
        keep = top_p > 0  # at a low temperature the tail underflows: those are no candidates
        lm_lp = torch.where(keep, top_p.log(), torch.tensor(float("-inf"), dtype=torch.float64))
        cand = top_i.tolist()
        if ngram is not None and alpha > 0:
            ng = ngram.mixed_probs([prompt_ids + d for d in alive], cand, weights)
            lp = (1 - alpha) * lm_lp[None] + alpha * ng.log()
            unsupported = torch.isinf(lp).all(dim=1)
            lp[unsupported] = (1 - alpha) * lm_lp - penalty
        else:
            lp = lm_lp[None].expand(len(alive), -1)
        total = (alive_lp[:, None] + lp).flatten()
        n_best = min(2 * k, int(torch.isfinite(total).sum()))
        best_scores, best = total.topk(n_best)
        new_alive, new_lp = [], []
        for score, flat in zip(best_scores.tolist(), best.tolist()):
            row, j = divmod(flat, m)
            seq = alive[row] + [cand[j]]
            if cand[j] in eos_ids:
                finished.append((seq, score))
            elif len(new_alive) < k:
                new_alive.append(seq)
                new_lp.append(score)
        if not new_alive:
            alive = []
            break
        alive, alive_lp = new_alive, torch.tensor(new_lp, dtype=torch.float64)
        if step == room - 1:
            break
        # One input for every draft: their latest tokens' embeddings, weighted by draft probability.
        w = torch.softmax(alive_lp, dim=0).to(device=device)
        latest = embed(torch.tensor([d[-1] for d in alive], device=device))
        mixed = (w.to(latest.dtype)[:, None] * latest).sum(0)
        logits = _forward(model, cache, len(prompt_ids) + step + 1, inputs_embeds=mixed[None, None])
        forwards += 1
    pool = [(d, s, "eos") for d, s in finished]
    pool += [(d, float(s), "length" if room == max_new_tokens else "context")
             for d, s in zip(alive, alive_lp.tolist())]
    pool.sort(key=lambda x: x[1] / max(1, len(x[0])), reverse=True)
    pool = pool[:k]
    return ([p[0] for p in pool], [p[1] / max(1, len(p[0])) for p in pool], forwards,
            [p[2] for p in pool])
