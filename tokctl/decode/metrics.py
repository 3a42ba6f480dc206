"""Aggregates of a decode run, overall and per category, as Spec-Bench reports them.

``speedup`` is the ratio of throughputs (total new tokens over total time, method against
baseline, both measured in the same run); the per-sample ratios give its median and spread.
``mean_accepted_tokens`` is new tokens per target forward pass, the hardware-independent figure.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from tokctl import measure
from tokctl.console import console
from tokctl.decode import long_figures


def _per_byte(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Speed per byte (every method), and the cut-prompt scores where the rows have them."""
    made = sum(r.get("new_bytes", 0) for r in rows)
    t = sum(r["time_s"] for r in rows)
    out: dict[str, Any] = {
        "new_bytes": made,
        "bytes_per_s": made / t if t > 0 else None,
        "calls_per_byte": sum(r["steps"] for r in rows) / made if made else None,
    }
    scored = [r for r in rows if "exact_match" in r]
    if scored:
        out["exact_match"] = sum(r["exact_match"] for r in scored) / len(scored)
        out["ref_logprob_per_byte"] = sum(r["ref_logprob_per_byte"] for r in scored) / len(scored)
        mid = [r for r in scored if r.get("mid_token")]
        out["mid_token_cuts"] = len(mid)
        if mid:
            out["exact_match_mid_token"] = sum(r["exact_match"] for r in mid) / len(mid)
            out["ref_logprob_per_byte_mid_token"] = (
                sum(r["ref_logprob_per_byte"] for r in mid) / len(mid))
    return out


def _group(rows: list[dict[str, Any]], has_baseline: bool) -> dict[str, Any]:
    new = sum(r["new_tokens"] for r in rows)
    t = sum(r["time_s"] for r in rows)
    steps = sum(r["steps"] for r in rows)
    out: dict[str, Any] = {
        "num_samples": len(rows),
        "new_tokens": new,
        "time_s": t,
        "tokens_per_s": new / t if t > 0 else None,
        "mean_accepted_tokens": new / steps if steps else None,
        **_per_byte(rows),
    }
    if has_baseline:
        b_new = sum(r["baseline"]["new_tokens"] for r in rows)
        b_t = sum(r["baseline"]["time_s"] for r in rows)
        b_steps = sum(r["baseline"]["steps"] for r in rows)
        out["baseline_new_tokens"] = b_new
        out["baseline_time_s"] = b_t
        out["baseline_tokens_per_s"] = b_new / b_t if b_t > 0 else None
        out["baseline_mean_accepted_tokens"] = b_new / b_steps if b_steps else None
        base = _per_byte([r["baseline"] for r in rows])
        out.update({f"baseline_{k}": v for k, v in base.items()})
        if any(r.get("unit") == "bytes" or r["baseline"].get("unit") == "bytes" for r in rows):
            new, b_new = out["new_bytes"], out["baseline_new_bytes"]  # speedup in bytes/s
        overall = measure.ratio(b_t, t, b_new, new) if new else None
        out.update(measure.speedup_figures(overall, [r.get("speedup") for r in rows]))
        ident = [bool(r.get("identical_to_baseline")) for r in rows]
        out["identical_to_baseline"] = sum(ident) / len(ident) if ident else None
    out.update(long_figures.group_figures(rows, has_baseline))
    return out


def aggregate(rows: list[dict[str, Any]], has_baseline: bool) -> dict[str, Any]:
    ok = [r for r in rows if "error" not in r and "error" not in r.get("baseline", {})]
    failed = [r for r in rows if r not in ok]
    metrics = _group(ok, has_baseline) if ok else {"num_samples": 0}
    metrics["failed_samples"] = len(failed)
    cats: dict[str, list[dict[str, Any]]] = {}
    for r in ok:
        cats.setdefault(r["category"], []).append(r)
    metrics["per_category"] = {c: _group(rs, has_baseline) for c, rs in sorted(cats.items())}
    if ok:
        metrics["tokens_per_s_sample_median"] = measure.median(
            [r["tokens_per_s"] for r in ok if r["tokens_per_s"]])
    return metrics


def _f(v: Any, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def print_summary(metrics: dict[str, Any], method: str, baseline: str | None) -> None:
    title = f"decode: {method}" + (f" vs {baseline}" if baseline else "")
    table = Table(title=title)
    cols = ["category", "n", "tok/s"]
    if baseline:
        cols += [f"{baseline} tok/s", "speedup"]
    cols += ["accepted/step"]
    if baseline:
        cols += ["identical"]
    for c in cols:
        table.add_column(c, justify="left" if c == "category" else "right")

    def row(name: str, m: dict[str, Any]) -> list[str]:
        cells = [name, str(m.get("num_samples", 0)), _f(m.get("tokens_per_s"), 1)]
        if baseline:
            cells += [_f(m.get("baseline_tokens_per_s"), 1), _f(m.get("speedup"))]
        cells += [_f(m.get("mean_accepted_tokens"))]
        if baseline:
            cells += [_f(m.get("identical_to_baseline"))]
        return cells

    for cat, m in metrics.get("per_category", {}).items():
        table.add_row(*row(cat, m))
    table.add_row(*row("[bold]overall[/]", metrics), end_section=True)
    console.print(table)
    if baseline and metrics.get("speedup_median") is not None:
        console.print(f"per-sample speedup: median {_f(metrics['speedup_median'])}, "
                      f"interquartile {_f(metrics['speedup_q25'])}-{_f(metrics['speedup_q75'])}")
    if metrics.get("also"):
        _print_methods(metrics, method, baseline)
    if baseline and metrics.get("decode_speedup") is not None:
        _print_long(metrics, method, baseline)
    if metrics.get("exact_match") is not None or metrics.get("unit") == "bytes":
        _print_per_byte(metrics, method, baseline)
    if metrics.get("failed_samples"):
        console.print(f"[yellow]{metrics['failed_samples']} sample(s) failed; their reasons are "
                      f"in samples.jsonl[/]")


def _print_methods(metrics: dict[str, Any], method: str, baseline: str | None) -> None:
    """All methods of the run side by side: speedup per category (rows) and method (columns)."""
    methods = [(method, metrics), *metrics["also"].items()]
    table = Table(title=f"speedup over {baseline} per category (accepted tokens per step)")
    table.add_column("category")
    for name, _ in methods:
        table.add_column(name, justify="right")

    def cell(m: dict[str, Any]) -> str:
        return f"{_f(m.get('speedup'))} ({_f(m.get('mean_accepted_tokens'))})"

    for cat in metrics.get("per_category", {}):
        table.add_row(cat, *[cell(m.get("per_category", {}).get(cat, {})) for _, m in methods])
    table.add_row("[bold]overall[/]", *[cell(m) for _, m in methods], end_section=True)
    table.add_row("identical", *[_f(m.get("identical_to_baseline")) for _, m in methods])
    console.print(table)


def _print_long(metrics: dict[str, Any], method: str, baseline: str) -> None:
    """Long-context figures: decode speed without the prefill, answers, agreement, cache read."""
    methods = [(method, metrics), *(metrics.get("also") or {}).items()]
    table = Table(title=f"long context: against {baseline} (prefill left out of the speeds)")
    for c in ["method", "decode tok/s", "decode speedup", "accuracy", "agreement (prefix)",
              "perplexity", "cache read"]:
        table.add_column(c, justify="left" if c == "method" else "right")
    for name, m in methods:
        table.add_row(name, _f(m.get("decode_tokens_per_s"), 1), _f(m.get("decode_speedup")),
                      _f(m.get("accuracy")),
                      f"{_f(m.get('agreement'))} ({_f(m.get('agreement_prefix'))})",
                      _f(m.get("perplexity")), _f(m.get("cache_read")))
    table.add_row(baseline, _f(metrics.get("baseline_decode_tokens_per_s"), 1), "1.00",
                  _f(metrics.get("baseline_accuracy")), "1.00 (1.00)",
                  _f(metrics.get("baseline_perplexity")), "1.00", end_section=True)
    console.print(table)
    console.print(f"prefill: {_f(metrics.get('prefill_s'))} s per prompt (mean), timed apart")


def _print_per_byte(metrics: dict[str, Any], method: str, baseline: str | None) -> None:
    """Every method of the run per byte: speed, model calls, and on cut prompts (data=cut) exact
    match of the first bytes and the reference's log-likelihood (overall, then mid-token cuts)."""
    methods = [(method, metrics), *(metrics.get("also") or {}).items()]
    if baseline:
        methods.append((baseline, {k.removeprefix("baseline_"): v for k, v in metrics.items()
                                   if k.startswith("baseline_")}))
    scored = metrics.get("exact_match") is not None
    table = Table(title="per byte" + (" (cut prompts: all | mid-token cuts)" if scored else ""))
    cols = ["method", "bytes/s", "calls/byte"]
    if scored:
        cols += ["exact match", "log-lik/byte"]
    for c in cols:
        table.add_column(c, justify="left" if c == "method" else "right")
    for name, m in methods:
        cells = [name, _f(m.get("bytes_per_s"), 1), _f(m.get("calls_per_byte"), 3)]
        if scored:
            cells += [f"{_f(m.get('exact_match'))} | {_f(m.get('exact_match_mid_token'))}",
                      f"{_f(m.get('ref_logprob_per_byte'), 3)} | "
                      f"{_f(m.get('ref_logprob_per_byte_mid_token'), 3)}"]
        table.add_row(*cells)
    console.print(table)
