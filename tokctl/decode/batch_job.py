"""`tokctl decode batch_size=B`: methods that decode a batch of prompts at once (`ar`,
`skipdecode`), measured against `ar` at the same batch size.

Prompts are taken B at a time (first turns), left-padded, and decoded on
:class:`tokctl.decode.batched.BatchedLlama`; the method and the baseline take turns batch by
batch after a warm-up. Tokens per second count every sequence's tokens (up to its EOS). Quality,
untimed: per prompt, agreement with the baseline's tokens (same token at the same position, and
the identical prefix), the full model's perplexity of each output, and for the built-in math
prompts whether the output's last number is the right answer (and the baseline's).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from tokctl import measure
from tokctl.console import console, progress_bar, step
from tokctl.decode.batched import BatchedLlama, decode_batch
from tokctl.decode.data import encode
from tokctl.decode.long_figures import agreement, full_model_nll
from tokctl.errors import UserError

# The built-in math prompts' answers (tokctl/decode/prompts/builtin.jsonl): 15 pencils at 3 for
# $1.20; 4x + 7 = 31; 300 km in 3.5 h.
MATH_ANSWERS = {"math-1": 6.0, "math-2": 6.0, "math-3": 300 / 3.5}


def last_number(text: str) -> float | None:
    found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _correct(text: str, answer: float) -> bool:
    got = last_number(text)
    return got is not None and abs(got - answer) <= 0.01 * max(1.0, abs(answer))


def _decoder(method, settings):
    if getattr(method, "name", None) == "skipdecode":
        return lambda engine, ids, gen: decode_batch(
            engine, ids, settings, gen, method.first_layer_at(settings.max_new_tokens))
    if getattr(method, "name", None) == "ar":
        return lambda engine, ids, gen: decode_batch(engine, ids, settings, gen)
    raise UserError(f"method={method.name} does not decode in batches; batch_size= takes "
                    f"method=ar or method=skipdecode")


def run(cfg, run, prompts, method, baseline, also, loaded, settings) -> dict[str, Any]:
    from tokctl.decode.target import make_target
    from tokctl.models import fast_llama

    bs = int(cfg.get("batch_size") or 1)
    if bs < 1:
        raise UserError(f"batch_size={bs} must be at least 1")
    if also:
        raise UserError("also=[...] is not taken with batched decoding (batch_size= or "
                        "method=skipdecode): one method against baseline=ar per run")
    if baseline is not None and baseline.name != "ar":
        raise UserError(f"baseline={baseline.name}: batched decoding compares with baseline=ar")
    if not fast_llama.supports(loaded.model):
        raise UserError("batched decoding needs a Llama-architecture model (the lean forward)")
    target = make_target(loaded.model, loaded.tokenizer, "fast")
    for m in (method, baseline):
        if m is not None:
            m.setup(target, loaded)
    engine = BatchedLlama(loaded.model)
    runners = [("method", method, _decoder(method, settings))]
    if baseline is not None:
        runners.append(("baseline", baseline, _decoder(baseline, settings)))
    tok = loaded.tokenizer
    chat = cfg.data.get("chat_template", "auto")
    ids = [encode(tok, [{"role": "user", "content": p.turns[0]}], chat) for p in prompts]
    batches = [list(range(i, min(len(ids), i + bs))) for i in range(0, len(ids), bs)]
    device = loaded.info["device"]
    console.print(f"[dim]{len(prompts)} prompts in {len(batches)} batch(es) of up to {bs}, "
                  f"{torch.get_num_threads()} threads[/]")
    if int(cfg.get("warmup", 1) or 0):
        from tokctl.decode.sampling import Settings

        short = Settings(min(16, settings.max_new_tokens), settings.sampling, settings.eos_ids)
        with step(f"warm-up: one batch, {short.max_new_tokens} tokens, untimed"):
            for _, m, _ in runners:
                _decoder(m, short)(engine, [ids[i] for i in batches[0]], None)
    results: dict[str, dict[int, list[int]]] = {name: {} for name, _, _ in runners}
    times = {name: 0.0 for name, _, _ in runners}
    with progress_bar(f"decode {method.name} vs {baseline.name if baseline else '-'} "
                      f"(batch {bs})", len(batches)) as advance:
        for b, index in enumerate(batches):
            row: dict[str, Any] = {"batch": b, "ids": [prompts[i].id for i in index]}
            for name, _, decode in measure.rotated(runners, b):
                gen = torch.Generator().manual_seed(int(cfg.seed) + b)
                seconds, outs = measure.timed(
                    lambda: decode(engine, [ids[i] for i in index], gen), device)
                times[name] += seconds
                results[name].update(zip(index, outs))
                made = sum(len(o) for o in outs)
                row[name] = {"time_s": seconds, "new_tokens": made,
                             "tokens_per_s": made / seconds if seconds > 0 else None}
            if baseline is not None:
                row["speedup"] = measure.ratio(row["baseline"]["time_s"], row["method"]["time_s"],
                                               row["baseline"]["new_tokens"],
                                               row["method"]["new_tokens"])
            run.append_sample(row)
            advance(1)
    return _quality(prompts, ids, results, times, target, tok, method, baseline, bs, settings)


def _quality(prompts, ids, results, times, target, tok, method, baseline, bs, settings):
    per_prompt = []
    with step("quality: the full model's perplexity of every output, agreement with ar"):
        for i, p in enumerate(prompts):
            out = results["method"][i]
            r: dict[str, Any] = {"id": p.id, "category": p.category,
                                 "text": tok.decode(out, skip_special_tokens=True)}
            nll = full_model_nll(target, ids[i], out)
            r["nll"], r["nll_tokens"] = nll if nll else (0.0, 0)
            if baseline is not None:
                base = results["baseline"][i]
                r["agreement_prefix"], r["agreement"] = agreement(out, base)
                r["identical_to_baseline"] = out == base
                r["baseline_text"] = tok.decode(base, skip_special_tokens=True)
                bnll = full_model_nll(target, ids[i], base)
                r["baseline_nll"], r["baseline_nll_tokens"] = bnll if bnll else (0.0, 0)
            if p.id in MATH_ANSWERS:
                r["math_correct"] = _correct(r["text"], MATH_ANSWERS[p.id])
                if baseline is not None:
                    r["baseline_math_correct"] = _correct(r["baseline_text"], MATH_ANSWERS[p.id])
            per_prompt.append(r)
    new = sum(len(o) for o in results["method"].values())
    metrics: dict[str, Any] = {
        "method": method.name, "baseline": baseline.name if baseline else None,
        "batch_size": bs, "num_samples": len(prompts), "new_tokens": new,
        "max_new_tokens": settings.max_new_tokens, "temperature": settings.sampling.temperature,
        "tokens_per_s": new / times["method"] if times["method"] else None,
        "perplexity": _ppl(per_prompt, "nll"), "method_info": method.run_info(),
        "threads": torch.get_num_threads(), "per_prompt": per_prompt}
    if baseline is not None:
        b_new = sum(len(o) for o in results["baseline"].values())
        metrics.update({
            "baseline_new_tokens": b_new,
            "baseline_tokens_per_s": b_new / times["baseline"] if times["baseline"] else None,
            "speedup": measure.ratio(times["baseline"], times["method"], b_new, new),
            "baseline_perplexity": _ppl(per_prompt, "baseline_nll"),
            "agreement": sum(r["agreement"] for r in per_prompt) / len(per_prompt),
            "agreement_prefix": sum(r["agreement_prefix"] for r in per_prompt) / len(per_prompt),
            "identical_to_baseline": sum(r["identical_to_baseline"] for r in per_prompt)
            / len(per_prompt)})
    math_rows = [r for r in per_prompt if "math_correct" in r]
    if math_rows:
        metrics["math_exact_match"] = sum(r["math_correct"] for r in math_rows) / len(math_rows)
        if baseline is not None:
            metrics["baseline_math_exact_match"] = (
                sum(r["baseline_math_correct"] for r in math_rows) / len(math_rows))
    keys = ("speedup", "tokens_per_s", "baseline_tokens_per_s", "agreement", "agreement_prefix",
            "perplexity", "baseline_perplexity", "math_exact_match", "baseline_math_exact_match")
    console.print("  ".join(f"{k} {metrics[k]:.3f}" for k in keys
                            if isinstance(metrics.get(k), float)))
    return metrics


def _ppl(rows, key: str) -> float | None:
    nll = sum(r.get(key, 0.0) for r in rows)
    count = sum(r.get(key + "_tokens", 0) for r in rows)
    return math.exp(nll / count) if count else None
