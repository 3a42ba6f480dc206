"""Figures for methods that may change the output (sparse decoding) and prompts with an answer.

Per sample (:func:`sample_figures`): ``correct`` (the prompt's answer appears in the output),
``agreement_prefix`` (tokens identical to the baseline's before the first difference, over the
baseline's count) and ``agreement`` (positions holding the same token, over the longer output),
``decode_s`` (the time less the prefill). Per group (:func:`group_figures`): their means,
``decode_tokens_per_s`` and ``decode_speedup`` (prefill left out of both sides), ``prefill_s``,
``cache_read`` (the fraction of the cache each layer read in a decode step, per layer and mean)
and ``perplexity`` (the full model's, on the method's outputs, when measured).
"""

from __future__ import annotations

import math
from typing import Any

from tokctl import measure


def answer_figures(result: dict[str, Any], answer: str | None) -> None:
    if answer is not None and "error" not in result:
        result["correct"] = any(answer in t for t in result["text"])


def agreement(a: list[int], b: list[int]) -> tuple[float, float]:
    """(identical prefix over len(b), same-position matches over the longer)."""
    prefix = 0
    for x, y in zip(a, b):
        if x != y:
            break
        prefix += 1
    same = sum(x == y for x, y in zip(a, b))
    return prefix / max(1, len(b)), same / max(1, len(a), len(b))


def sample_figures(result: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "prefill_s" in result:
        out["decode_s"] = result["time_s"] - result["prefill_s"]
    if base is not None:
        a = [t for turn in result["token_ids"] for t in turn]
        b = [t for turn in base["token_ids"] for t in turn]
        out["agreement_prefix"], out["agreement"] = agreement(a, b)
    return out


def full_model_nll(target, prompt_ids: list[int], tokens: list[int]) -> tuple[float, int] | None:
    """Summed negative log-likelihood of ``tokens`` after the prompt under the model with full
    attention (no sparse policy is installed outside a generation), and their count. The
    prompt's cache entries came from a full-attention prefill, so when the target still holds
    them only the new tokens run (one block), not the prompt again; a target that shares its
    prefill hands it over through prefill() itself."""
    import torch

    if not tokens:
        return None
    n = len(prompt_ids)
    held = target.prompt
    with torch.no_grad():
        if (n > 1 and not target.share_prefill and held is not None and held.numel() == n
                and target.length >= n and held.tolist() == list(prompt_ids)):
            target.truncate(n - 1)  # rerun the prompt's last token: its logits predict tokens[0]
            logits = target.forward([prompt_ids[-1], *tokens[:-1]])
            target.commit(list(range(len(tokens))))
        else:
            logits = target.prefill(prompt_ids, capacity=n + len(tokens) + 1)[None]
            if len(tokens) > 1:
                logits = torch.cat([logits, target.forward(tokens[:-1])])
                target.commit(list(range(len(tokens) - 1)))
        logp = torch.log_softmax(logits.float(), dim=-1)
        nll = -logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None]).sum()
    return float(nll), len(tokens)


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _decode_rate(rows):
    new = sum(r["new_tokens"] for r in rows)
    t = sum(r["time_s"] - r.get("prefill_s", 0.0) for r in rows)
    return new, t


def group_figures(rows: list[dict[str, Any]], has_baseline: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not rows:
        return out
    if all("prefill_s" in r for r in rows):
        new, t = _decode_rate(rows)
        out["prefill_s"] = _mean([r["prefill_s"] for r in rows])
        out["decode_tokens_per_s"] = new / t if t > 0 else None
        if has_baseline and all("prefill_s" in r["baseline"] for r in rows):
            b_new, b_t = _decode_rate([r["baseline"] for r in rows])
            out["baseline_decode_tokens_per_s"] = b_new / b_t if b_t > 0 else None
            out["decode_speedup"] = measure.ratio(b_t, t, b_new, new) if new and t > 0 else None
    if any("correct" in r for r in rows):
        out["accuracy"] = _mean([float(r["correct"]) for r in rows if "correct" in r])
        if has_baseline:
            out["baseline_accuracy"] = _mean([float(r["baseline"]["correct"]) for r in rows
                                              if "correct" in r.get("baseline", {})])
    if has_baseline and any("agreement" in r for r in rows):
        out["agreement_prefix"] = _mean([r.get("agreement_prefix") for r in rows])
        out["agreement"] = _mean([r.get("agreement") for r in rows])
    reads = [turn for r in rows for turn in (r.get("extra") or {}).get("cache_read", [])]
    if reads:
        per_layer = [sum(col) / len(col) for col in zip(*reads)]
        out["cache_read_per_layer"] = [round(x, 4) for x in per_layer]
        out["cache_read"] = sum(per_layer) / len(per_layer)
    for key, src in (("perplexity", rows), ("baseline_perplexity",
                                           [r["baseline"] for r in rows] if has_baseline else [])):
        nll = [r["nll"] for r in src if r.get("nll") is not None]
        if nll:
            out[key] = math.exp(sum(x for x, _ in nll) / max(1, sum(n for _, n in nll)))
    return out
