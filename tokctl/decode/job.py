"""`tokctl decode`: run a decoding method beside a baseline on the same prompts.

Both run on the same loaded model, sample by sample, in alternating order (method first on even
samples, baseline first on odd ones) after a warm-up, so slow drift of a shared machine affects
both alike. Each sample's row is appended to samples.jsonl as soon as it is done.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import OmegaConf

from tokctl import kernels, measure
from tokctl.console import console, progress_bar, step
from tokctl.decode import long_context, long_figures
from tokctl.decode import cut
from tokctl.decode.base import DecodingMethod, Generation
from tokctl.decode.data import Prompt, encode, load_prompts
from tokctl.decode.metrics import aggregate, print_summary
from tokctl.decode.sampling import Sampling, Settings
from tokctl.errors import UserError


def settings_from(cfg) -> Settings:
    max_new = int(cfg.max_new_tokens)
    if max_new < 1:
        raise UserError(f"max_new_tokens={max_new} must be at least 1")
    s = Sampling(temperature=float(cfg.temperature), top_k=int(cfg.top_k or 0),
                 top_p=float(cfg.top_p))
    if s.temperature < 0:
        raise UserError(f"temperature={s.temperature} must be >= 0 (0 is greedy)")
    if not 0 < s.top_p <= 1:
        raise UserError(f"top_p={s.top_p} must be in (0, 1]")
    if s.top_k < 0:
        raise UserError(f"top_k={s.top_k} must be >= 0 (0 disables it)")
    return Settings(max_new_tokens=max_new, sampling=s)


def method_config(name: str):
    """A method's config from conf/decode/method/, for `baseline=<method>`."""
    from tokctl.config import conf_dir

    folder = conf_dir("decode") / "method"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        options = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise UserError(f"baseline={name} is not a decoding method; choose one of: {options}")
    return OmegaConf.load(path)


def draft_model_config(value: str, model_cfg):
    """`draft_model=` takes a model config name (conf/decode/model/), a folder, a .gguf file or a
    hub id; dtype, device and backend follow the target's."""
    from pathlib import Path

    from tokctl.config import conf_dir

    named = conf_dir("decode") / "model" / f"{value}.yaml"
    if named.is_file():
        cfg = OmegaConf.load(named)
    elif Path(value).expanduser().is_dir():
        cfg = OmegaConf.create({"path": value})
    elif value.endswith(".gguf"):
        cfg = OmegaConf.create({"gguf": value})
    else:
        cfg = OmegaConf.create({"id": value})
    for key in ("dtype", "device", "backend"):
        cfg[key] = model_cfg.get(key)
    return cfg


def early_exit_draft(loaded, value: str):
    """`draft_model=self:N`: the target's first N layers, its final norm and head, as the draft
    (self-speculation by early exit; the weights are shared, not copied)."""
    from dataclasses import replace

    try:
        layers = int(value.split(":", 1)[1])
    except ValueError:
        raise UserError(f"draft_model={value}: write self:N with N a number of layers") from None
    return replace(loaded, source=f"{loaded.source} (first {layers} layers)",
                   info={**loaded.info, "exit_layer": layers}, draft=None)


def extra_method(item) -> DecodingMethod:
    """One entry of `also=[...]`: a method config name, or a mapping naming one (``method``) with
    options to change and an optional ``label``: also=[lookup,{method:recycling,budget:80}]."""
    if isinstance(item, str):
        m = build_method(method_config(item))
        m.label = item
        return m
    if not OmegaConf.is_dict(item) or "method" not in item:
        raise UserError(f"also: {item} is neither a method name nor a mapping with a `method` key")
    options = {k: v for k, v in OmegaConf.to_container(item).items() if k not in ("method", "label")}
    cfg = OmegaConf.merge(method_config(str(item["method"])), options)
    m = build_method(cfg)
    m.label = str(item.get("label") or item["method"] + "(" + ",".join(
        f"{k}={v}" for k, v in options.items()) + ")")
    return m


def build_method(method_cfg) -> DecodingMethod:
    from tokctl.instantiate import instantiate

    params = OmegaConf.to_container(method_cfg, resolve=True)
    name = params.pop("name", None)
    return instantiate(params, f"method {name}")


def eos_ids(loaded) -> frozenset[int]:
    ids: set[int] = set()
    for src in (loaded.tokenizer.eos_token_id, getattr(loaded.model.generation_config, "eos_token_id", None)):
        if src is None:
            continue
        ids.update([src] if isinstance(src, int) else list(src))
    return frozenset(ids)


class Runner:
    """One method on the shared model: generates every turn of a prompt and times it."""

    def __init__(self, label: str, method: DecodingMethod, loaded, chat_template, device,
                 scored: bool = False):
        self.scored = scored
        self.label = label
        self.method = method
        self.loaded = loaded
        self.chat_template = chat_template
        self.device = device

    def run(self, prompt: Prompt, settings: Settings, seed: int) -> dict[str, Any]:
        tok = self.loaded.tokenizer
        messages: list[dict[str, str]] = []
        gens: list[Generation] = []
        texts, ids_per_turn, prompt_lens = [], [], []
        elapsed = prefill_s = 0.0
        ids_first = None
        new_bytes = 0
        generator = torch.Generator().manual_seed(seed)
        max_pos = self.method.target.max_positions
        for turn in prompt.turns:
            messages.append({"role": "user", "content": turn})
            ids = encode(tok, messages, self.chat_template)
            ids_first = ids_first or ids
            if len(ids) >= max_pos:
                return {"error": f"prompt has {len(ids)} tokens, more than the model's context "
                                 f"of {max_pos}"}
            target = self.method.target
            target.prefill_s = 0.0
            shared = target.shared_prefill_s
            seconds, gen = measure.timed(lambda: self.method.generate(ids, settings, generator),
                                         self.device)
            prefill_s += target.prefill_s
            elapsed += seconds + target.shared_prefill_s - shared  # a shared prefill's time too
            gens.append(gen)
            if gen.new_bytes is None:
                text = tok.decode(gen.tokens, skip_special_tokens=True)
                made = text.encode("utf-8")
            else:
                made = gen.new_bytes
                text = made.decode("utf-8", errors="replace")
            new_bytes += len(made)
            texts.append(text)
            ids_per_turn.append(gen.tokens)
            prompt_lens.append(len(ids))
            messages.append({"role": "assistant", "content": text})
        new_tokens = sum(len(g.tokens) for g in gens)
        steps = sum(g.steps for g in gens)
        row = {
            "new_tokens": new_tokens,
            "time_s": elapsed,
            "tokens_per_s": new_tokens / elapsed if elapsed > 0 else None,
            "steps": steps,
            "accepted_per_step": new_tokens / steps if steps else None,
            "unit": self.method.unit,
            "new_bytes": new_bytes,
            "bytes_per_s": new_bytes / elapsed if elapsed > 0 else None,
            "calls_per_byte": steps / new_bytes if new_bytes else None,
            "finish_reason": [g.finish_reason for g in gens],
            "prompt_tokens": prompt_lens,
            "token_ids": ids_per_turn,
            "text": texts,
        }
        if self.scored:  # long-context runs: prefill apart, answers, the full model's perplexity
            row["prefill_s"] = prefill_s
            long_figures.answer_figures(row, prompt.answer)
            row["nll"] = long_figures.full_model_nll(self.method.target, ids_first, gens[0].tokens)
        if prompt.reference is not None:  # a cut prompt (data=cut): one turn, scored untimed
            row.update(cut.score(self.method, ids, made, prompt, settings))
        extra: dict[str, Any] = {}
        for g in gens:
            for k, v in g.extra.items():
                extra.setdefault(k, []).append(v)
        if extra:
            row["extra"] = extra
        return row


def run(cfg, run) -> dict[str, Any]:
    from tokctl.decode.target import make_target
    from tokctl.models.loading import load_causal_lm

    kernels.reset_counts()
    settings = settings_from(cfg)
    if long_context.wanted(cfg.data):
        long_context.check(cfg.data, settings.max_new_tokens)
        prompts = None  # sized in the model's tokens: built once the tokenizer loads
    else:
        prompts = load_prompts(cfg.data)  # a bad data file fails before the model loads
    baseline_name = cfg.get("baseline")
    method = build_method(cfg.method)
    baseline = build_method(method_config(str(baseline_name))) if baseline_name else None
    also = [extra_method(item) for item in (cfg.get("also") or [])]
    labels = [m.label for m in also]
    if len(set(labels)) < len(labels) or method.name in labels:
        raise UserError(f"also={labels}: give each extra method once (a `label` tells variants of "
                        f"one method apart), and not the main method")
    if also and baseline is None:
        raise UserError("also=[...] compares extra methods against the baseline: set baseline=NAME")

    for m in [method, *also, *([baseline] if baseline else [])]:
        if m.needs_draft and not cfg.get("draft_model"):
            raise UserError(f"method={m.name} needs a draft model: add draft_model=NAME (a model "
                            f"config such as smollm2-135m, a folder, a .gguf file or a hub id)")
    loaded = load_causal_lm(cfg.model)
    if str(cfg.get("draft_model") or "").startswith("self:"):
        loaded.draft = early_exit_draft(loaded, str(cfg.draft_model))
    elif cfg.get("draft_model"):
        loaded.draft = load_causal_lm(draft_model_config(str(cfg.draft_model), cfg.model))
        run.update_env(draft_model_source=loaded.draft.source,
                       draft_model_load_s=round(loaded.draft.load_s, 3))
    settings.eos_ids = eos_ids(loaded)
    quant = str(cfg.model.get("quant") or "none")
    if quant != "none":
        from tokctl.models.quant import QUANTS, quantize

        if quant not in QUANTS:
            raise UserError(f"model.quant={quant} is not one of {', '.join(QUANTS)}")
        quantize(loaded.model, quant)  # ar, hf and every method then run the same int8 weights
        loaded.info["quant"] = quant
    from tokctl.models.quant import prepack, prepack_applies

    try:
        packed = prepack_applies(loaded.model, str(cfg.model.get("prepack", "auto")).lower(), quant,
                                 compiled=bool(cfg.get("compile", False)))
    except ValueError as e:
        raise UserError(str(e)) from None
    if packed:
        prepack(loaded.model)  # shared, like quant: every method and baseline read packed weights
    loaded.info["prepacked"] = packed
    if cfg.get("batch_size") is not None or getattr(method, "batched", False):
        if prompts is None:
            raise UserError(f"data={cfg.data.name} is not decoded in batches; batch_size= and "
                            f"method=skipdecode take prompt sets (builtin, jsonl)")
        from tokctl.decode import batch_job

        return batch_job.run(cfg, run, prompts, method, baseline, also, loaded, settings)
    target = make_target(loaded.model, loaded.tokenizer, str(cfg.model.get("backend") or "auto"),
                         compile=bool(cfg.get("compile", False)), exact=bool(cfg.get("exact", False)))
    # The weight format, for the verify-cost table's key: each costs differently.
    target.quant = "prepacked" if packed else (None if quant == "none" else quant)
    if prompts is None:
        long_context.check(cfg.data, settings.max_new_tokens, target.max_positions)
        with step(f"building data={cfg.data.name} at {cfg.data.context_tokens} tokens"):
            prompts = long_context.build(cfg.data, loaded.tokenizer, settings.max_new_tokens,
                                         target.max_positions)
    if cfg.get("verify_cost", "cached") not in ("cached", "measure"):
        raise UserError(f"verify_cost={cfg.verify_cost} must be 'cached' or 'measure'")
    target.remeasure_cost = cfg.get("verify_cost") == "measure"
    run.update_env(model_source=loaded.source, model_load_s=round(loaded.load_s, 3),
                   model=loaded.info, backend=target.backend, dtype=loaded.info["dtype"],
                   device=loaded.info["device"], compiled=target.compiled, exact=target.exact)
    console.print(f"[dim]model {loaded.source} loaded in {loaded.load_s:.2f}s "
                  f"({loaded.info['dtype']}, {loaded.info['device']}, backend {target.backend}"
                  f"{', compiled' if target.compiled else ''}{', exact' if target.exact else ''}, "
                  f"{torch.get_num_threads()} threads)[/]")
    chat = cfg.data.get("chat_template", "auto")
    device = loaded.info["device"]
    scored = long_context.wanted(cfg.data)
    # Long prompts: the methods and the baseline decode from one prefill of each prompt (they all
    # prefill with full attention), each charged its measured time.
    target.share_prefill = scored
    runners = [Runner("method", method, loaded, chat, device, scored)]
    runners += [Runner(m.label, m, loaded, chat, device, scored) for m in also]
    if baseline is not None:
        runners.append(Runner("baseline", baseline, loaded, chat, device, scored))
    for r in runners:
        r.method.setup(target, loaded)

    if target.compiled:
        with step("compiling the decode step (untimed; minutes on a CPU)"):
            target.compile_now()
    warm = int(cfg.get("warmup", 1) or 0)
    if warm:
        short = Settings(max_new_tokens=min(16, settings.max_new_tokens), sampling=settings.sampling,
                         eos_ids=settings.eos_ids)
        snaps = [r.method.snapshot() for r in runners]
        with step(f"warm-up: {min(warm, len(prompts))} prompt(s), {short.max_new_tokens} tokens, "
                  f"{len(runners)} method(s), untimed"):
            for prompt in prompts[:warm]:
                for r in runners:
                    r.run(prompt, short, seed=int(cfg.seed))
        for r, snap in zip(runners, snaps):
            r.method.restore(snap)

    rows: list[dict[str, Any]] = []
    title = f"decode {method.name}" + "".join(f", {m.label}" for m in also)
    title += f" vs {baseline.name}" if baseline else ""
    try:
        with progress_bar(title, len(prompts)) as advance:
            for i, prompt in enumerate(prompts):
                # Who goes first rotates, so that slow drift of a shared machine hits all alike.
                results = {r.label: r.run(prompt, settings, seed=int(cfg.seed) + i)
                           for r in measure.rotated(runners, i)}
                row: dict[str, Any] = {"index": i, "id": prompt.id, "category": prompt.category}
                row.update(_against(results["method"], results.get("baseline")))
                if baseline is not None:
                    row["baseline"] = results["baseline"]
                if also:
                    row["also"] = {m.label: _against(results[m.label], results["baseline"])
                                   for m in also}
                run.append_sample(row)
                rows.append(row)
                advance(info=_progress_info(rows))
    except KeyboardInterrupt:
        run.write_metrics(_metrics(rows, method, baseline, also, settings, partial=True))
        raise
    finally:
        for r in runners:
            r.method.finish()
    metrics = _metrics(rows, method, baseline, also, settings)
    print_summary(metrics, method.name, baseline.name if baseline else None)
    plot_error = _plot(run, metrics, method, also)
    if plot_error:
        metrics["plot_error"] = plot_error
    return metrics


def _against(result: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    """A method's sample result with its exactness and speedup against the baseline's."""
    out = dict(result)
    if "prefill_s" in result:  # a long-context run: agreement, decode time without the prefill
        out.update(long_figures.sample_figures(result, None if base is None or "error" in base
                                               else base))
    if base is not None and "error" not in result and "error" not in base:
        if by_bytes(result, base):  # a byte-level method: its text and bytes/s are what compare
            out["identical_to_baseline"] = result["text"] == base["text"]
            work = "new_bytes"
        else:
            out["identical_to_baseline"] = result["token_ids"] == base["token_ids"]
            work = "new_tokens"
        out["speedup"] = measure.ratio(base["time_s"], result["time_s"],
                                       max(1, base[work]), result[work])
    return out


def by_bytes(*results: dict[str, Any]) -> bool:
    return any(r.get("unit") == "bytes" for r in results)


def _plot(run, metrics: dict[str, Any], method, also) -> str | None:
    """Speedup and accepted tokens per category per method, as PNGs in the run folder; why they
    could not be drawn (None when they were)."""
    from tokctl.plots import RunRecord, decode_figures

    records = [RunRecord(run.path, "decode", None, {}, metrics, method.name)]
    records += [RunRecord(run.path, "decode", None, {}, {**m, "baseline": metrics.get("baseline")},
                          name) for name, m in (metrics.get("also") or {}).items()]
    try:
        decode_figures(records, run.path)
    except Exception as exc:  # noqa: BLE001 - a failed plot must not cost the run its metrics
        from rich.markup import escape

        why = f"{type(exc).__name__}: {exc}"
        console.print(f"[yellow]warning[/]: could not draw the plots ({escape(why)}); "
                      f"metrics.json: plot_error")
        return why
    return None


def _progress_info(rows: list[dict[str, Any]]) -> str:
    done = [r for r in rows if "error" not in r]
    if not done:
        return ""
    t = max(1e-9, sum(r["time_s"] for r in done))
    if by_bytes(*done):
        return f"{sum(r['new_bytes'] for r in done) / t:.1f} bytes/s"
    return f"{sum(r['new_tokens'] for r in done) / t:.1f} tok/s"


def _metrics(rows, method, baseline, also, settings, partial: bool = False) -> dict[str, Any]:
    metrics = aggregate(rows, has_baseline=baseline is not None)
    if also:
        metrics["also"] = {}
        for m in also:
            extra_rows = [{**r["also"][m.label], "index": r["index"], "category": r["category"],
                           "baseline": r["baseline"]} for r in rows if "also" in r]
            metrics["also"][m.label] = {**aggregate(extra_rows, has_baseline=True),
                                       "method_info": m.run_info()}
    metrics.update(method=method.name, unit=method.unit,
                   baseline=baseline.name if baseline else None,
                   temperature=settings.sampling.temperature, max_new_tokens=settings.max_new_tokens,
                   threads=torch.get_num_threads(), method_info=method.run_info(),
                   baseline_info=baseline.run_info() if baseline else None,
                   kernel=kernels.path_taken())
    if partial:
        metrics["partial"] = True
    return metrics
