"""The figures of `tokctl report`, one function per command, each reading only metrics.json.

Every function takes the completed runs of one command (a :class:`RunRecord` each, labelled by
what varies between them) and writes PNGs into ``out``; it returns a :class:`Figure` per file,
with the sentence the markdown summary prints beside it. Plots are drawn with matplotlib's Agg
backend (no display needed) and written atomically.

Data each one reads (keys of metrics.json; config keys in brackets):

- decode: ``per_category.<category>.{speedup, speedup_q25, speedup_q75, mean_accepted_tokens}``
  (``speedup_q1/q3`` in older runs) and the same keys at the top level (the overall figure),
  ``baseline``.
- compress-vit: ``speedup`` (else ``images_per_s``, ``baseline_images_per_s``), ``gflops``,
  ``baseline_gflops``, ``flops_ratio``,
  ``top1`` and ``baseline_top1`` (or ``agreement`` where images have no labels),
  [``method.name`` and its level option, one of :data:`LEVEL_KEYS`].
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
                      lambda r, g: _quartiles(at(r, g)))
        ax.axhline(1.0, color="black", lw=1, ls="--", label="baseline (1.0x)")
        ax.set_ylabel("speedup over the baseline\n(x, ratio of tokens/s; higher is faster \u2191)")
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
        ax.set_ylabel("new tokens per target forward pass\n(tokens/step; higher is better \u2191)")
        ax.set_xlabel("prompt category")
        ax.set_title("decode: mean accepted tokens per step (hardware-independent)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        _save(fig, out / "decode_accepted.png")
        figures.append(Figure("decode_accepted.png", "Mean accepted tokens per step",
                              "New tokens per forward pass of the target model, per category: the "
                              "figure that transfers across machines (1.0 = plain decoding)."))
    return figures


def _quartiles(m: dict[str, Any]) -> tuple[float | None, float | None]:
    """The per-sample speedup's quartiles, under today's names or older ones (q1/q3)."""
    return (_num(m.get("speedup_q25", m.get("speedup_q1"))),
            _num(m.get("speedup_q75", m.get("speedup_q3"))))


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
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
LINESTYLES = ("-", "--", "-.", ":")
# The option that sets a method's compression level, to name its points by when nothing else
# in the label does (a sweep of methods at their default levels).
LEVEL_KEYS = ("r", "keep_rate", "target_flops", "clusters", "keep_ratio", "checkpoint")


def compress_vit_figures(runs: list[RunRecord], out: Path) -> list[Figure]:
    plt = _pyplot()
    figures = []
    for panel in tradeoff_panels(runs):
        fig, ax = plt.subplots(figsize=(7.4, 4.8))
        draw_tradeoff(ax, runs, panel)
        ax.legend(loc="best")
        _save(fig, out / panel.file)
        figures.append(Figure(panel.file, f"Accuracy against {panel.what}",
                              f"One line per method through its compression levels (each point "
                              f"named by its setting); better trade-offs lie {panel.better}. The "
                              f"hollow star is the uncompressed model, measured in the same runs."))
    return figures


@dataclass
class TradeoffPanel:
    xkey: str
    base_key: str | None  # the uncompressed model's x (None: 1.0, a speedup)
    xlabel: str
    what: str  # "throughput" / "FLOPs"
    better: str  # where better trade-offs lie, in the axes' own terms
    file: str
    ykey: str
    ylabel: str


def tradeoff_panels(runs: list[RunRecord]) -> list[TradeoffPanel]:
    """The accuracy-against-cost panels the runs have data for: throughput, then GFLOPs."""
    labelled = any(_num(r.metrics.get("top1")) is not None for r in runs)
    y = ("top1", "top-1 accuracy (%, higher is better)") if labelled else \
        ("agreement", "top-1 agreement with the uncompressed model (%, higher is better)")
    # Throughput as the speedup measured against the uncompressed model in the same run
    # (interleaved batches): images/s of separate runs differ with the machine's load.
    if any(_num(r.metrics.get("speedup")) is not None for r in runs):
        speed = ("speedup", None, "speedup over the uncompressed model, same run (x, higher is "
                                  "faster →)")
    else:
        speed = ("images_per_s", "baseline_images_per_s",
                 "throughput (images/s, higher is faster →)")
    panels = [TradeoffPanel(*speed, "throughput", "up and to the right (faster at the same "
                            "accuracy)", "compress_vit_accuracy_vs_throughput.png", *y),
              TradeoffPanel("gflops", "baseline_gflops", "GFLOPs per image (← lower is "
                            "cheaper)", "FLOPs", "up and to the left (fewer FLOPs at the same "
                            "accuracy)", "compress_vit_accuracy_vs_flops.png", *y)]
    return [p for p in panels if any(_num(r.metrics.get(p.xkey)) is not None
                                     and _num(r.metrics.get(p.ykey)) is not None for r in runs)]


def draw_tradeoff(ax, runs: list[RunRecord], panel: TradeoffPanel) -> None:
    """One line per method through its levels, every point named; the uncompressed model as a
    hollow star drawn beneath them, so a point at the same place (r=0) stays visible."""
    pts = [r for r in runs if _num(r.metrics.get(panel.xkey)) is not None
           and _num(r.metrics.get(panel.ykey)) is not None]
    by_method: dict[str, list[RunRecord]] = {}
    for r in pts:
        by_method.setdefault(_method_of(r), []).append(r)
    base = [(_num(r.metrics.get(panel.base_key)) if panel.base_key else 1.0,
             _num(r.metrics.get(f"baseline_{panel.ykey}")) if panel.ykey == "top1" else 1.0)
            for r in pts]
    base = [(x, 100 * y) for x, y in base if x is not None and y is not None]
    star = (sum(x for x, _ in base) / len(base), sum(y for _, y in base) / len(base)) if base else None
    if star:
        ax.scatter([star[0]], [star[1]], marker="*", s=300, facecolors="none", edgecolors="black",
                   linewidths=1.2, zorder=2, label="uncompressed model (mean over runs)")
        # below the star: the points' own labels sit above and to the right of them
        ax.annotate("uncompressed", star, textcoords="offset points", xytext=(0, -17),
                    ha="center", fontsize=7, zorder=4)
    every = [(_num(r.metrics[panel.xkey]), 100 * _num(r.metrics[panel.ykey])) for r in pts]
    every += [star] if star else []
    span_x = (max(x for x, _ in every) - min(x for x, _ in every)) or 1.0
    span_y = (max(y for _, y in every) - min(y for _, y in every)) or 1.0

    def near(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return abs(a[0] - b[0]) < 0.04 * span_x and abs(a[1] - b[1]) < 0.04 * span_y

    placed: list[tuple[float, float]] = []
    drawn: dict[tuple, str] = {}  # rounded points -> the method that drew them first
    for i, (method, rs) in enumerate(sorted(by_method.items())):
        # joined in order of compression (FLOPs are exact; measured speed is noisy)
        rs = sorted(rs, key=lambda r: -(_num(r.metrics.get("gflops")) or 0.0))
        xs = [_num(r.metrics[panel.xkey]) for r in rs]
        ys = [100 * _num(r.metrics[panel.ykey]) for r in rs]
        # Each method its own marker and line style, and markers smaller with each method
        # drawn: where two methods' points coincide, the later sits inside the earlier's.
        style = {"marker": MARKERS[i % len(MARKERS)], "ls": LINESTYLES[i % len(LINESTYLES)],
                 "ms": max(4.0, 11.0 - 3.5 * i), "mec": "white", "mew": 0.6, "zorder": 3 + i}
        twin = _same_points(drawn, method, xs, ys)
        ax.plot(xs, ys, label=method if twin is None else f"{method} (same points as {twin})",
                **style)
        for r, x, y in zip(rs, xs, ys):
            level = _level_of(r)
            if not level:
                continue
            # labels near an earlier label alternate above and below; near the star, higher
            crowd = sum(1 for p in placed if near(p, (x, y)))
            placed.append((x, y))
            lift = 13 if star and near(star, (x, y)) else 5
            ax.annotate(level, (x, y), textcoords="offset points",
                        xytext=(5, -12 if crowd % 2 else lift), fontsize=7, zorder=4)
    ax.margins(x=0.08, y=0.1)  # room for the labels at the edges
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.set_title(f"compress-vit: {panel.ylabel.split(' (')[0]} against {panel.what}\n"
                 f"better: {panel.better}")


def _same_points(drawn: dict[tuple, str], name: str, xs, ys) -> str | None:
    """The series already drawn at exactly these points (to 3 significant digits), if any;
    else remember these as ``name``'s."""
    key = tuple((float(f"{x:.3g}"), float(f"{y:.3g}")) for x, y in zip(xs, ys))
    if key in drawn:
        return drawn[key]
    drawn[key] = name
    return None


def _method_of(r: RunRecord) -> str:
    return str(r.config.get("method.name") or r.metrics.get("method") or "?")


def _level_of(r: RunRecord) -> str:
    """What sets this run apart from the others of its method (``r=8``, ``keep_rate=0.7``): its
    label without the method's name; else the method's level option, else its FLOPs ratio."""
    method = _method_of(r)
    parts = [p for p in r.label.split(", ") if p and p != method]
    if parts:
        return ", ".join(parts)
    for key in LEVEL_KEYS:
        v = r.config.get(f"method.{key}")
        if v is None or isinstance(v, dict) or isinstance(v, list) and len(v) > 3:
            continue  # a per-layer schedule is no name for a point
        text = Path(v).stem if isinstance(v, str) and "/" in v else str(v)
        return f"{key}={text}"
    ratio = _num(r.metrics.get("flops_ratio"))
    return f"{ratio:.2f} of FLOPs" if ratio is not None else ""


# ---------------------------------------------------------------------------- tokenize-image
RD_FILE = "tokenize_image_rate_distortion.png"


def tokenize_image_figures(runs: list[RunRecord], out: Path) -> list[Figure]:
    usable = [r for r in runs if isinstance(r.metrics.get("entries"), list) and r.metrics["entries"]]
    if not usable:
        return []
    rate_distortion_figure(usable, out / RD_FILE)
    return [Figure(RD_FILE, "Rate-distortion",
                   "Quality against the exact bytes per image (log scale): solid lines are "
                   "tokenizers (points labelled with the tokens kept), dashed lines JPEG and WebP "
                   "over their quality range (grey crosses: rate-controlled to the tokenizers' "
                   "budgets). Better is up (SSIM, PSNR) or down (rFID) at the same bytes, i.e. "
                   "toward the upper (lower) left.")]


def rate_distortion_figure(runs: list[RunRecord], path: Path, title: str | None = None) -> Path:
    """SSIM, PSNR (and rFID when measured) against bytes per image, one panel each. Every
    series has its own colour, marker and line style; one whose points repeat an earlier one's
    (the same tokenizer in two runs) says so in the legend and is drawn hollow and larger, so
    neither hides the other."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    keys = [("ssim", "SSIM (higher is better \u2191)"), ("psnr", "PSNR (dB, higher is better \u2191)")]
    if any(_num(e.get("rfid")) is not None for r in runs for e in r.metrics["entries"]):
        keys.append(("rfid", "rFID (lower is better \u2193)"))
    fig, axes = plt.subplots(1, len(keys), figsize=(5.4 * len(keys), 4.6), squeeze=False)
    axes = list(axes[0])
    many = len(runs) > 1
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles: dict[str, dict[str, Any]] = {}

    def style(name: str, classical: bool) -> dict[str, Any]:
        """One colour, marker and line style per series name, the same in every panel."""
        if name not in styles:
            i = len(styles)
            styles[name] = {"color": palette[i % len(palette)], "marker": MARKERS[i % len(MARKERS)],
                            "ls": ("--", "-.", ":")[i % 3] if classical else "-"}
        return styles[name]

    for ax, (key, ylabel) in zip(axes, keys):
        drawn: dict[tuple, str] = {}  # rounded points -> the series that drew them first
        curves_drawn: set[tuple[str, str]] = set()  # runs on the same images share a JPEG curve

        def plot(name: str, xs, ys, st: dict[str, Any], label: str, **kw) -> None:
            twin = _same_points(drawn, name, xs, ys)
            if twin is None:
                ax.plot(xs, ys, color=st["color"], marker=st["marker"], ls=st["ls"], label=label,
                        **kw)
            else:  # the same points again: hollow, larger, dotted, and said in the legend
                ax.plot(xs, ys, color=st["color"], marker=st["marker"], ls=":", ms=10,
                        mfc="none", mew=1.4, label=f"{label} (same points as {twin})", zorder=1)

        for r in runs:
            suffix = f" [{r.label}]" if many else ""
            curves = r.metrics.get("curves") or {}
            for codec, pts in sorted(curves.items()):
                pts = [p for p in pts if _num(p.get(key)) is not None]
                if pts and (codec, _data_of(r)) not in curves_drawn:
                    curves_drawn.add((codec, _data_of(r)))
                    plot(codec, [p["bytes_per_image"] for p in pts], [p[key] for p in pts],
                         style(codec, True), f"{codec} (quality sweep)", ms=3, alpha=0.8)
            entries = [e for e in r.metrics["entries"] if _num(e.get(key)) is not None]
            for codec in dict.fromkeys(e["codec"] for e in entries):
                rows = sorted((e for e in entries if e["codec"] == codec),
                              key=lambda e: e["bytes_per_image"])
                classical = rows[0].get("kind") == "classical"
                xs, ys = [e["bytes_per_image"] for e in rows], [e[key] for e in rows]
                if classical and any(_num(p.get(key)) is not None for p in curves.get(codec, [])):
                    # its rate-controlled points sit on the quality sweep drawn above
                    ax.plot(xs, ys, "x", color="grey", alpha=0.9, ms=7, zorder=4,
                            label="JPEG/WebP rate-controlled to the tokenizers' budgets")
                    continue
                name = codec if classical else f"{codec}{suffix}"
                label = f"{codec} (at the tokenizers' budgets)" if classical else name
                plot(name, xs, ys, style(name, classical), label, ms=6, zorder=3)
                if not classical and len(rows) <= 8:
                    for e in rows:
                        if e.get("tokens") is not None:
                            ax.annotate(str(e["tokens"]), (e["bytes_per_image"], e[key]),
                                        textcoords="offset points", xytext=(4, -11), fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("bytes per image (exact file size, log scale; \u2190 smaller)")
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel.split(" (")[0])
    uniq: dict[str, Any] = {}
    for ax in axes:  # every series once, whichever panel drew it
        for handle, label in zip(*ax.get_legend_handles_labels()):
            uniq.setdefault(label, handle)
    fig.legend(uniq.values(), uniq.keys(), loc="lower center", ncol=min(3, len(uniq)),
               bbox_to_anchor=(0.5, -0.02), frameon=False, fontsize=8)
    n_img = sorted({r.metrics.get("images") for r in runs if r.metrics.get("images")})
    fig.suptitle(title or ("tokenize-image: rate-distortion, tokenizers against JPEG and WebP"
                           + (f" ({', '.join(str(n) for n in n_img)} images)" if n_img else ""))
                 + "\nnumbers at points: tokens kept", fontsize=11)
    rows = -(-len(uniq) // 3)
    fig.tight_layout(rect=(0, 0.04 + 0.045 * rows, 1, 1))
    _save(fig, path)
    return path


def _data_of(r: RunRecord) -> str:
    return str(r.config.get("data.path"))


PLOTTERS: dict[str, Callable[[list[RunRecord], Path], list[Figure]]] = {
    "decode": decode_figures,
    "compress-vit": compress_vit_figures,
    "tokenize-image": tokenize_image_figures,
    "tokenize-image eval": tokenize_image_figures,
}
