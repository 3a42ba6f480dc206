"""The figures of `tokctl report`, one function per command, each reading only metrics.json.

Every function takes the completed runs of one command (a :class:`RunRecord` each, labelled by
what varies between them) and writes PNGs into ``out``; it returns a :class:`Figure` per file,
with the sentence the markdown summary prints beside it. Plots are drawn with matplotlib's Agg
backend (no display needed) and written atomically.

Data each one reads (keys of metrics.json; config keys in brackets):

- decode: ``per_category.<category>.{speedup, speedup_q25, speedup_q75, mean_accepted_tokens}``
  and the same keys at the top level (the overall figure), ``baseline``.
- compress-vit: ``speedup`` (else ``images_per_s``, ``baseline_images_per_s``), ``gflops``,
  ``baseline_gflops``,
  ``top1`` and ``baseline_top1`` (or ``agreement`` where images have no labels),
  [``method.name``, ``method.r``].
- tokenize-image (eval): ``entries``: a list with one entry per codec and budget,
  ``{codec, kind: "tokenizer" | "classical", bytes_per_image, ssim, psnr, ms_ssim?, rfid?,
  tokens?}``; and ``curves``: ``{codec: [{quality, bytes_per_image, ssim, psnr}, ...]}``, the
  classical codecs' full quality sweeps.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tokctl.runs import atomic_write_bytes


@dataclass
class RunRecord:
    path: Path
    command: str
    status: str | None
    config: dict[str, Any]  # flattened: "method.r" -> 8
    metrics: dict[str, Any]
    label: str = ""


@dataclass
class Figure:
    file: str
    title: str
    shows: str  # one sentence for the summary: what to read off the plot
    notes: list[str] = field(default_factory=list)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3,
                         "axes.spines.top": False, "axes.spines.right": False,
                         "legend.fontsize": 8, "axes.titlesize": 11})
    return plt


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    import matplotlib.pyplot as plt

    plt.close(fig)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# ------------------------------------------------------------------------------------ decode
def decode_figures(runs: list[RunRecord], out: Path) -> list[Figure]:
    plt = _pyplot()
    cats = sorted({c for r in runs for c in (r.metrics.get("per_category") or {})})
    groups = cats + ["overall"]

    def at(r: RunRecord, group: str) -> dict[str, Any]:
        return r.metrics if group == "overall" else (r.metrics.get("per_category") or {}).get(group, {})

    figures = []
    baselines = sorted({str(r.metrics.get("baseline")) for r in runs if r.metrics.get("baseline")})
    with_speed = [r for r in runs if any(_num(at(r, g).get("speedup")) for g in groups)]
    if with_speed:
        fig, ax = plt.subplots(figsize=_bar_figsize(len(groups), len(with_speed)))
        _grouped_bars(ax, groups, with_speed, lambda r, g: _num(at(r, g).get("speedup")),
                      lambda r, g: (_num(at(r, g).get("speedup_q25")), _num(at(r, g).get("speedup_q75"))))
        ax.axhline(1.0, color="black", lw=1, ls="--", label="baseline (1.0x)")
        ax.set_ylabel("speedup over the baseline (x, ratio of tokens/s)")
        ax.set_xlabel("prompt category")
        vs = f" vs {', '.join(baselines)}" if baselines else ""
        ax.set_title(f"decode: speedup per category and method{vs}\n"
                     "bars: total tokens/s ratio; whiskers: per-sample interquartile range")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        _save(fig, out / "decode_speedup.png")
        figures.append(Figure("decode_speedup.png", "Speedup per category per method",
                              "Each bar is a method's throughput over its baseline's in the same run "
                              "(above the dashed line = faster); whiskers show the spread over "
                              "samples. Wall-clock ratios drift with machine load: compare bars "
                              "within one sweep."))
    with_acc = [r for r in runs if any(_num(at(r, g).get("mean_accepted_tokens")) for g in groups)]
    if with_acc:
        fig, ax = plt.subplots(figsize=_bar_figsize(len(groups), len(with_acc)))
        _grouped_bars(ax, groups, with_acc, lambda r, g: _num(at(r, g).get("mean_accepted_tokens")))
        ax.axhline(1.0, color="black", lw=1, ls="--", label="one token per step")
        ax.set_ylabel("new tokens per target forward pass")
        ax.set_xlabel("prompt category")
        ax.set_title("decode: mean accepted tokens per step (hardware-independent)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        _save(fig, out / "decode_accepted.png")
        figures.append(Figure("decode_accepted.png", "Mean accepted tokens per step",
                              "New tokens per forward pass of the target model, per category: the "
                              "figure that transfers across machines (1.0 = plain decoding)."))
    return figures


def _bar_figsize(groups: int, series: int) -> tuple[float, float]:
    """Wider with more bars, but never a strip: 13 categories x 5 methods stay readable."""
    return min(16.0, max(6.0, 0.9 * groups * max(1, series) ** 0.5 + 2)), 5.0


def _grouped_bars(ax, groups: list[str], runs: list[RunRecord], value: Callable,
                  spread: Callable | None = None) -> None:
    n = len(runs)
    width = 0.8 / max(n, 1)
    values = []
    for i, r in enumerate(runs):
        xs, ys, ranges = [], [], []
        for j, g in enumerate(groups):
            v = value(r, g)
            if v is None:
                continue
            x = j - 0.4 + width * (i + 0.5)
            xs.append(x)
            ys.append(v)
            q1, q3 = spread(r, g) if spread is not None else (None, None)
            if q1 is not None and q3 is not None:
                ranges.append((x, q1, q3))
        ax.bar(xs, ys, width=width * 0.95, label=r.label)
        if ranges:  # drawn from q1 to q3 wherever they lie, not anchored on the bar
            ax.errorbar([x for x, _, _ in ranges], [(a + b) / 2 for _, a, b in ranges],
                        yerr=[(b - a) / 2 for _, a, b in ranges], fmt="none", ecolor="black",
                        elinewidth=0.9, capsize=2.5)
        values.append((xs, ys))
    top = max((y for _, ys in values for y in ys), default=1.0)
    if n * len(groups) <= 24:  # values at the foot of the bars, clear of whiskers and lines
        for xs, ys in values:
            for x, y in zip(xs, ys):
                if y > 0.12 * top:
                    ax.text(x, 0.02 * top, f"{y:.2f}", ha="center", va="bottom", fontsize=7,
                            color="white", fontweight="bold", rotation=90 if n > 3 else 0)
    ax.set_xticks(range(len(groups)), groups, rotation=20 if len(groups) > 6 else 0)
    ax.set_ylim(bottom=0)


# ------------------------------------------------------------------------------ compress-vit
def compress_vit_figures(runs: list[RunRecord], out: Path) -> list[Figure]:
    plt = _pyplot()
    labelled = any(_num(r.metrics.get("top1")) is not None for r in runs)
    ykey, ylabel = ("top1", "top-1 accuracy (%)") if labelled else \
        ("agreement", "top-1 agreement with the uncompressed model (%)")
    figures = []
    # Throughput as the speedup measured against the uncompressed model in the same run
    # (interleaved batches): images/s of separate runs differ with the machine's load.
    if any(_num(r.metrics.get("speedup")) is not None for r in runs):
        speed = ("speedup", None, "throughput over the uncompressed model's, same run "
                                  "(x, higher is faster)")
    else:
        speed = ("images_per_s", "baseline_images_per_s", "throughput (images/s, higher is faster)")
    for xkey, base_key, xlabel, fname, what in (
            (*speed, "compress_vit_accuracy_vs_throughput.png", "throughput"),
            ("gflops", "baseline_gflops", "GFLOPs per image (lower is cheaper)",
             "compress_vit_accuracy_vs_flops.png", "FLOPs")):
        pts = [r for r in runs if _num(r.metrics.get(xkey)) is not None
               and _num(r.metrics.get(ykey)) is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(7.0, 4.6))
        by_method: dict[str, list[RunRecord]] = {}
        for r in pts:
            by_method.setdefault(_method_of(r), []).append(r)
        for method, rs in sorted(by_method.items()):
            # joined in order of compression (FLOPs are exact; measured speed is noisy)
            rs = sorted(rs, key=lambda r: -(_num(r.metrics.get("gflops")) or 0.0))
            xs = [_num(r.metrics[xkey]) for r in rs]
            ys = [100 * _num(r.metrics[ykey]) for r in rs]
            ax.plot(xs, ys, "o-", label=method)
            for r, x, y in zip(rs, xs, ys):
                level = _level_of(r)
                if level:
                    ax.annotate(level, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        base = [(_num(r.metrics.get(base_key)) if base_key else 1.0,
                 _num(r.metrics.get(f"baseline_{ykey}")) if ykey == "top1" else 1.0) for r in pts]
        base = [(x, y) for x, y in base if x is not None and y is not None]
        if base:
            bx = sum(x for x, _ in base) / len(base)
            by = 100 * sum(y for _, y in base) / len(base)
            ax.scatter([bx], [by], marker="*", s=160, color="black", zorder=5,
                       label="uncompressed (mean over runs)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"compress-vit: {ylabel.split(' (')[0]} against {what}\n"
                     f"(points labelled with each method's setting)")
        ax.legend(loc="best")
        _save(fig, out / fname)
        up = "up and to the right" if xkey == "images_per_s" else "up and to the left"
        figures.append(Figure(fname, f"Accuracy against {what}",
                              f"One line per method through its compression levels; better "
                              f"trade-offs lie {up}. The star is the uncompressed model, measured "
                              f"in the same runs."))
    return figures


def _method_of(r: RunRecord) -> str:
    return str(r.config.get("method.name") or r.metrics.get("method") or "?")


def _level_of(r: RunRecord) -> str:
    """What sets this run apart from the others of its method (``r=8``, ``keep_rate=0.7``):
    its label without the method's name."""
    method = _method_of(r)
    parts = [p for p in r.label.split(", ") if p != method]
    return ", ".join(parts)


# ---------------------------------------------------------------------------- tokenize-image
def tokenize_image_figures(runs: list[RunRecord], out: Path) -> list[Figure]:
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    usable = [r for r in runs if isinstance(r.metrics.get("entries"), list) and r.metrics["entries"]]
    if not usable:
        return []
    keys = [("ssim", "SSIM (higher is better)"), ("psnr", "PSNR (dB, higher is better)")]
    if any(_num(e.get("rfid")) is not None for r in usable for e in r.metrics["entries"]):
        keys.append(("rfid", "rFID (lower is better)"))
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.4))
    many = len(usable) > 1
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours: dict[str, str] = {}

    def colour(name: str) -> str:  # one colour per codec (and run) in every panel
        return colours.setdefault(name, palette[len(colours) % len(palette)])

    for ax, (key, ylabel) in zip(axes, keys):
        drawn: set[tuple[str, str]] = set()  # runs on the same images share one JPEG/WebP curve
        for r in usable:
            suffix = f" [{r.label}]" if many else ""
            curves = r.metrics.get("curves") or {}
            for codec, pts in sorted(curves.items()):
                pts = [p for p in pts if _num(p.get(key)) is not None]
                if pts and (codec, _data_of(r)) not in drawn:
                    drawn.add((codec, _data_of(r)))
                    ax.plot([p["bytes_per_image"] for p in pts], [p[key] for p in pts], "--",
                            alpha=0.7, color=colour(codec), label=f"{codec} (quality sweep)")
            entries = [e for e in r.metrics["entries"] if _num(e.get(key)) is not None]
            for codec in dict.fromkeys(e["codec"] for e in entries):
                rows = sorted((e for e in entries if e["codec"] == codec),
                              key=lambda e: e["bytes_per_image"])
                classical = rows[0].get("kind") == "classical"
                xs, ys = [e["bytes_per_image"] for e in rows], [e[key] for e in rows]
                if classical and any(_num(p.get(key)) is not None for p in curves.get(codec, [])):
                    # its rate-controlled points sit on the quality sweep drawn above
                    ax.plot(xs, ys, "x", color="grey", alpha=0.8,
                            label="JPEG/WebP at the tokenizers' budgets")
                    continue
                name = codec if classical else f"{codec}{suffix}"
                ax.plot(xs, ys, "s--" if classical else "o-", color=colour(name),
                        label=f"{codec} (at the tokenizers' budgets)" if classical else name)
                if not classical and len(rows) <= 8:
                    for e in rows:
                        if e.get("tokens") is not None:
                            ax.annotate(str(e["tokens"]), (e["bytes_per_image"], e[key]),
                                        textcoords="offset points", xytext=(3, -10), fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("bytes per image (exact file size, log scale)")
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel.split(" (")[0])
    uniq: dict[str, Any] = {}
    for ax in axes:  # every series once, whichever panel drew it
        for handle, label in zip(*ax.get_legend_handles_labels()):
            uniq.setdefault(label, handle)
    axes[0].legend(uniq.values(), uniq.keys(), loc="best")
    n_img = {r.metrics.get("images") for r in usable}
    fig.suptitle("tokenize-image: rate-distortion, tokenizers against JPEG and WebP"
                 + (f" ({', '.join(str(n) for n in sorted(x for x in n_img if x))} images)"
                    if any(n_img) else ""))
    fig.tight_layout()
    _save(fig, out / "tokenize_image_rate_distortion.png")
    return [Figure("tokenize_image_rate_distortion.png", "Rate-distortion",
                   "Quality against the exact bytes per image: solid lines are tokenizers (points "
                   "labelled with the tokens kept), dashed lines JPEG and WebP over their quality "
                   "range (grey crosses: rate-controlled to the tokenizers' budgets). Better is "
                   "up (SSIM, PSNR) or down (rFID) at the same bytes.")]


def _data_of(r: RunRecord) -> str:
    return str(r.config.get("data.path"))


PLOTTERS: dict[str, Callable[[list[RunRecord], Path], list[Figure]]] = {
    "decode": decode_figures,
    "compress-vit": compress_vit_figures,
    "tokenize-image": tokenize_image_figures,
    "tokenize-image eval": tokenize_image_figures,
}
