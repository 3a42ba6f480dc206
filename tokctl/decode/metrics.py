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
    }
    if has_baseline:
        b_new = sum(r["baseline"]["new_tokens"] for r in rows)
        b_t = sum(r["baseline"]["time_s"] for r in rows)
        b_steps = sum(r["baseline"]["steps"] for r in rows)
        out["baseline_new_tokens"] = b_new
        out["baseline_time_s"] = b_t
        out["baseline_tokens_per_s"] = b_new / b_t if b_t > 0 else None
        out["baseline_mean_accepted_tokens"] = b_new / b_steps if b_steps else None
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
