"""Trade-off plots from compress-vit run folders (reads only their metrics.json).

    python -m tokctl.vit.plots SWEEP_OR_RUN... [--out tradeoff.png]

Two panels: top-1 (or agreement with the uncompressed model where there are no labels) against
measured speedup, and against GFLOPs; one line per method, the uncompressed model as a star.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def collect(paths: list[Path]) -> list[dict]:
    rows = []
    for root in paths:
        files = [root / "metrics.json"] if (root / "metrics.json").is_file() else sorted(root.rglob("metrics.json"))
        for f in files:
            try:
                m = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if "speedup" in m and "gflops" in m:
                # Folders named "<method><variant>-<level>" (tokctl.vit.figures) plot one line per
                # variant; others (a sweep's 0, 1, ...) one line per method.
                head = f.parent.name.split("-")[0]
                m["_group"] = head if head.startswith(str(m.get("method"))) else m.get("method")
                rows.append(m)
    return rows


def tradeoff_figure(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_top1 = all(r.get("top1") is not None for r in rows)
    key, base_key = ("top1", "baseline_top1") if use_top1 else ("agreement", None)
    by_method = defaultdict(list)
    for r in rows:
        by_method[r.get("_group") or r["method"]].append(r)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, rs in sorted(by_method.items()):
        rs.sort(key=lambda r: r["gflops"])
        for ax, x in zip(axes, ("speedup", "gflops")):
            ax.plot([r[x] for r in rs], [r[key] for r in rs], "o-", label=method)
    base = rows[0]
    baseline_y = base[base_key] if base_key else 1.0
    axes[0].plot([1.0], [baseline_y], "k*", markersize=12, label="uncompressed")
    axes[1].plot([base["baseline_gflops"]], [baseline_y], "k*", markersize=12)
    axes[0].set_xlabel("speedup (images/s over the uncompressed model, same run)")
    axes[1].set_xlabel("GFLOPs (multiply-adds) per image")
    for ax in axes:
        ax.set_ylabel("top-1" if use_top1 else "agreement with the uncompressed model")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("tradeoff.png"))
    args = parser.parse_args(argv)
    rows = collect(args.runs)
    if not rows:
        print(f"error: no compress-vit metrics.json under {', '.join(map(str, args.runs))}", file=sys.stderr)
        return 2
    print(tradeoff_figure(rows, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
