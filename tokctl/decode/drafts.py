"""`tokctl decode drafts`: Superposed Decoding against nucleus sampling and beam search.

For each k in ``ks`` every prompt gets k drafts from each of: superposed (one pass), nucleus
(method=ar's loop k times) and beam search of width k, plus one ar sample that is the unit of
cost. Everything runs on one loaded model, interleaved prompt by prompt in a rotating order.
Per method and k: time for all k drafts as a ratio to one ar sample (per prompt, then the mean
and median), each draft's perplexity under the full model, distinct-n among the k, and, where the
data gives a reference answer (Spec-Bench's ``reference``), the best-of-k unigram F1 against it.
"""

from __future__ import annotations

import copy
import json
import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from tokctl.console import console, progress_bar
from tokctl.decode.data import load_prompts
from tokctl.decode.job import Runner, build_method, eos_ids, method_config, settings_from
from tokctl.decode.sampling import Settings
from tokctl.errors import UserError


# --- measures ------------------------------------------------------------------------------------
@torch.inference_mode()
def prompt_state(model, prompt_ids: list[int]):
    """The prompt's KV cache and its last position's logits: every draft of a prompt is scored
    from them, so a long prompt (Spec-Bench's summaries, 700 tokens) is run once, not per draft."""
    from transformers import DynamicCache

    from tokctl.decode.methods.superposed import _cache_keyword

    cache = DynamicCache()  # filled in place by the forward
    out = model(input_ids=torch.tensor([prompt_ids], device=model.device), use_cache=True,
                **{_cache_keyword(model): cache})
    return cache, out.logits[0, -1]


@torch.inference_mode()
def perplexity(model, prompt_ids: list[int], draft: list[int], state=None) -> float | None:
    """exp(mean negative log-likelihood of the draft's tokens given the prompt), full model;
    ``state`` from prompt_state() saves running the prompt again."""
    if not draft:
        return None
    if state is None:
        ids = torch.tensor([prompt_ids + draft], device=model.device)
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
    else:
        past, last = state
        # The forward appends the draft to the cache it is given: each draft gets its own copy.
        past = copy.deepcopy(past)
        from tokctl.decode.methods.superposed import _cache_keyword

        out = model(input_ids=torch.tensor([draft], device=model.device), use_cache=True,
                    **{_cache_keyword(model): past})
        logits = torch.cat([last[None], out.logits[0, :-1]]).float()
    target = torch.tensor(draft, device=logits.device)
    return float(torch.exp(torch.nn.functional.cross_entropy(logits, target)))


def distinct_n(drafts: list[list[int]], n: int) -> float | None:
    """Distinct n-grams over all n-grams of the k drafts together (1.0: nothing repeated)."""
    grams = [tuple(d[i:i + n]) for d in drafts for i in range(len(d) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def unigram_f1(text: str, reference: str) -> float:
    a = Counter(re.findall(r"\w+", text.lower()))
    b = Counter(re.findall(r"\w+", reference.lower()))
    common = sum((a & b).values())
    if not common:
        return 0.0
    p, r = common / sum(a.values()), common / sum(b.values())
    return 2 * p * r / (p + r)


def references(data_cfg) -> dict[str, str]:
    """Known continuations by prompt id: the first turn's ``reference`` in Spec-Bench files."""
    path = data_cfg.get("path")
    if not path:
        return {}
    out = {}
    for line in Path(str(path)).expanduser().read_text(encoding="utf-8").splitlines():
        if line.strip():
            obj = json.loads(line)
            ref = obj.get("reference")
            if isinstance(ref, list) and ref and isinstance(ref[0], str) and ref[0].strip():
                out[str(obj.get("question_id", obj.get("id")))] = ref[0]
    return out


# --- the run ---------------------------------------------------------------------------------------
FAMILIES = ("superposed", "nucleus", "beam")


def _methods(cfg, ks: list[int], families: list[str]):
    """(label, method, family, k) for every compared method; `ar` first, the unit of cost."""
    out = [("ar", build_method(method_config("ar")), "ar", 1)]
    sup_opts = OmegaConf.to_container(cfg.get("superposed") or {}, resolve=True)
    for k in ks:
        if "superposed" in families:
            sup = OmegaConf.merge(method_config("superposed"), sup_opts, {"k": k})
            out.append((f"superposed k={k}", build_method(sup), "superposed", k))
        for family in ("nucleus", "beam"):
            if family in families:
                m = build_method(OmegaConf.merge(method_config(family), {"k": k}))
                out.append((f"{family} k={k}", m, family, k))
    return out


def _families(cfg) -> list[str]:
    raw = cfg.get("families") or list(FAMILIES)
    listed = OmegaConf.is_list(raw) or isinstance(raw, list)
    families = [str(f) for f in (raw if listed else [raw])]
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        raise UserError(f"families={families}: choose among {', '.join(FAMILIES)}")
    return families


def run(cfg, run) -> dict[str, Any]:
    from tokctl.decode.target import make_target
    from tokctl.models.loading import load_causal_lm

    ks = [int(k) for k in (cfg.ks if OmegaConf.is_list(cfg.ks) else [cfg.ks])]
    bad = [k for k in ks if k < 1]
    if not ks or bad:
        raise UserError(f"ks={list(ks)}: every k (drafts per prompt) must be at least 1")
    settings = settings_from(cfg)
    if settings.sampling.greedy:
        raise UserError("temperature=0 makes the k nucleus samples identical; use temperature > 0")
    ns = [int(n) for n in cfg.distinct_n]
    prompts = load_prompts(cfg.data)
    refs = references(cfg.data)
    families = _families(cfg)
    sup = cfg.get("superposed") or {}
    if "superposed" in families and not sup.get("ngram") and float(sup.get("alpha", 1) or 0) > 0:
        # Said here, before the model loads, and with drafts' own key (not method.ngram).
        raise UserError("superposed needs an n-gram model: build one with `tokctl decode "
                        "build-ngram` and pass superposed.ngram=RUN/ngram.json (or "
                        "superposed.alpha=0 for none, or families=[nucleus,beam])")
    methods = _methods(cfg, ks, families)
    model_cfg = OmegaConf.merge(cfg.model, {"backend": str(cfg.get("backend") or "hf")})
    loaded = load_causal_lm(model_cfg)
    settings.eos_ids = eos_ids(loaded)
    target = make_target(loaded.model, loaded.tokenizer, str(model_cfg.backend))
    run.update_env(model_source=loaded.source, backend=target.backend, dtype=loaded.info["dtype"])
    chat = cfg.data.get("chat_template", "auto")
    runners = []
    for label, method, _, _ in methods:
        method.setup(target, loaded)
        runners.append(Runner(label, method, loaded, chat, loaded.info["device"]))
    console.print(f"[dim]{len(prompts)} prompts, k in {ks}, {len(runners)} methods, backend "
                  f"{target.backend}, {torch.get_num_threads()} threads[/]")

    if int(cfg.get("warmup", 1) or 0):
        short = Settings(max_new_tokens=min(8, settings.max_new_tokens), sampling=settings.sampling,
                         eos_ids=settings.eos_ids)
        for r in runners:
            r.run(prompts[0], short, seed=int(cfg.seed))

    rows = []
    try:
        _run_prompts(cfg, run, prompts, runners, methods, settings, loaded, chat, refs, ns, rows)
    except KeyboardInterrupt:  # the finished prompts still make a table, a plot and metrics
        run.write_metrics(_finish(rows, methods, ns, settings, target, run, partial=True))
        raise
    return _finish(rows, methods, ns, settings, target, run)


def _finish(rows, methods, ns, settings, target, run, partial: bool = False) -> dict[str, Any]:
    metrics = aggregate(rows, methods, ns)
    metrics.update(prompts=len(rows), ks=sorted({k for _, _, f, k in methods if f != "ar"}),
                   max_new_tokens=settings.max_new_tokens,
                   temperature=settings.sampling.temperature, top_p=settings.sampling.top_p,
                   backend=target.backend, threads=torch.get_num_threads(),
                   superposed_info={label: m.run_info() for label, m, fam, _ in methods
                                    if fam == "superposed"})
    if partial:
        metrics["partial"] = True
    if rows:
        print_table(metrics)
        try:
            plot(metrics, run.file("drafts_cost_perplexity.png"))
        except Exception as exc:  # noqa: BLE001 - a failed plot must not cost the run its metrics
            console.print(f"[yellow]could not draw the plot: {exc}[/]")
    return metrics


def _run_prompts(cfg, run, prompts, runners, methods, settings, loaded, chat, refs, ns, rows):
    with progress_bar("drafts: superposed, nucleus, beam", len(prompts)) as advance:
        for i, prompt in enumerate(prompts):
            shift = i % len(runners)
            order = runners[shift:] + runners[:shift]
            results = {r.label: r.run(prompt, settings, seed=int(cfg.seed) + i) for r in order}
            row = {"index": i, "id": prompt.id, "category": prompt.category, "methods": {}}
            ar_time = results["ar"].get("time_s")
            prompt_ids = _prompt_ids(loaded.tokenizer, prompt, chat)
            state = prompt_state(loaded.model, prompt_ids)
            for (label, method, family, k) in methods:
                res = results[label]
                if "error" in res:
                    row["methods"][label] = {"error": res["error"]}
                    continue
                drafts = (res.get("extra") or {}).get("drafts", [res["token_ids"]])[0]
                ppl = [perplexity(loaded.model, prompt_ids, d, state) for d in drafts]
                texts = [loaded.tokenizer.decode(d, skip_special_tokens=True) for d in drafts]
                entry = {"family": family, "k": k, "time_s": res["time_s"],
                         "cost_vs_ar": res["time_s"] / ar_time if ar_time else None,
                         "perplexity": ppl, "drafts": texts,
                         "draft_tokens": [len(d) for d in drafts]}
                for n in ns:
                    entry[f"distinct_{n}"] = distinct_n(drafts, n)
                if prompt.id in refs:
                    entry["best_of_k_f1"] = max(unigram_f1(t, refs[prompt.id]) for t in texts)
                row["methods"][label] = entry
            run.append_sample(row)
            rows.append(row)
            advance()


def _prompt_ids(tokenizer, prompt, chat) -> list[int]:
    from tokctl.decode.data import encode

    return encode(tokenizer, [{"role": "user", "content": prompt.turns[0]}], chat)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def aggregate(rows, methods, ns) -> dict[str, Any]:
    out: dict[str, Any] = {"methods": {}}
    for label, _, family, k in methods:
        entries = [r["methods"][label] for r in rows if "error" not in r["methods"].get(label, {
            "error": 1})]
        if not entries:
            continue
        ratios = [e["cost_vs_ar"] for e in entries if e["cost_vs_ar"] is not None]
        agg = {"family": family, "k": k, "prompts": len(entries),
               "time_s": _mean([e["time_s"] for e in entries]),
               "cost_vs_ar": _mean(ratios),
               "cost_vs_ar_median": statistics.median(ratios) if ratios else None,
               # mean over prompts of the mean over that prompt's drafts
               "perplexity": _mean([_mean(e["perplexity"]) for e in entries]),
               "perplexity_median": statistics.median(
                   [p for e in entries for p in e["perplexity"] if p is not None] or [float("nan")]),
               "best_of_k_f1": _mean([e.get("best_of_k_f1") for e in entries]),
               "draft_tokens": _mean([_mean(e["draft_tokens"]) for e in entries])}
        for n in ns:
            agg[f"distinct_{n}"] = _mean([e.get(f"distinct_{n}") for e in entries])
        out["methods"][label] = agg
    return out


def print_table(metrics) -> None:
    from rich.table import Table

    table = Table(title="k drafts per prompt: cost (x one ar sample), perplexity, diversity")
    cols = ["method", "k", "time s", "cost/ar", "cost/ar med", "ppl", "ppl med", "distinct-1",
            "distinct-2", "best-of-k F1", "tokens"]
    for c in cols:
        table.add_column(c, justify="left" if c == "method" else "right")

    def f(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    for label, m in metrics["methods"].items():
        table.add_row(m["family"], str(m["k"]), f(m["time_s"]), f(m["cost_vs_ar"]),
                      f(m["cost_vs_ar_median"]), f(m["perplexity"]), f(m["perplexity_median"]),
                      f(m.get("distinct_1")), f(m.get("distinct_2")), f(m["best_of_k_f1"], ".3f"),
                      f(m["draft_tokens"], ".1f"))
    console.print(table)


def plot(metrics, path: Path) -> None:
    from tokctl.plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    families = {}
    for m in metrics["methods"].values():
        families.setdefault(m["family"], []).append(m)
    for family, ms in families.items():
        ms = sorted(ms, key=lambda m: m["k"])
        xs = [m["cost_vs_ar"] for m in ms]
        ys = [m["perplexity"] for m in ms]
        ax.plot(xs, ys, marker="o", label=family)
        for m, x, y in zip(ms, xs, ys):
            if family != "ar":
                ax.annotate(f"k={m['k']}", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
    ax.set_xlabel("time for all k drafts / time of one ar sample")
    ax.set_ylabel("mean draft perplexity under the model")
    ax.set_xscale("log")
    ax.set_title("cost against perplexity, k drafts per prompt")
    ax.legend()
    _save(fig, path)
