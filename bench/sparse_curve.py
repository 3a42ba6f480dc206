"""Decode speedup and passkey accuracy against context length, one line per method, from the run
folders of sparse-decoding runs (`tokctl decode ... data=passkey data.context_tokens=N`).

    python bench/sparse_curve.py RUN [RUN ...] [--out sparse_curve.png]

Each run gives one point per method (the main one and every `also=` entry) at its
``data.context_tokens``; the baseline's accuracy is drawn dashed. Prints the table it plots.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def points(runs: list[Path]) -> dict[str, list[tuple[int, dict]]]:
    """method -> [(context tokens, its metrics)], the baseline under its own name."""
    out: dict[str, list[tuple[int, dict]]] = {}
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        n = int(cfg["data"]["context_tokens"])
        out.setdefault(metrics["method"], []).append((n, metrics))
        for label, m in (metrics.get("also") or {}).items():
            out.setdefault(label, []).append((n, m))
        base = {"decode_speedup": 1.0, "accuracy": metrics.get("baseline_accuracy")}
        out.setdefault(metrics.get("baseline") or "baseline", []).append((n, base))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in out.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("sparse_curve.png"))
    args = ap.parse_args(argv)
    pts = points(args.runs)
    print(f"{'method':22} {'context':>8} {'decode speedup':>15} {'accuracy':>9} {'cache read':>11}")
    for name, ps in pts.items():
        for n, m in ps:
            f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            print(f"{name:22} {n:>8} {f(m.get('decode_speedup')):>15} {f(m.get('accuracy')):>9} "
                  f"{f(m.get('cache_read', 1.0)):>11}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, ps in pts.items():
        xs = [n for n, _ in ps]
        style = "--" if all(m.get("decode_speedup") == 1.0 for _, m in ps) else "-"
        a.plot(xs, [m.get("decode_speedup") for _, m in ps], style, marker="o", label=name)
        b.plot(xs, [m.get("accuracy") for _, m in ps], style, marker="o", label=name)
    a.set(xlabel="context tokens", ylabel="decode speedup over full attention")
    b.set(xlabel="context tokens", ylabel="passkey accuracy", ylim=(-0.05, 1.05))
    a.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
