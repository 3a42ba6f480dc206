"""Trade-off plots from compress-vit run folders (reads only their files).

    python -m tokctl.vit.plots SWEEP_OR_RUN... [--out tradeoff.png]

Two panels in one PNG: top-1 (or agreement with the uncompressed model where there are no
labels) against measured speedup, and against GFLOPs; one line per method through its levels,
every point named, the uncompressed model as a hollow star. The panels are the ones
`tokctl report` writes as two files (:func:`tokctl.plots.draw_tradeoff`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokctl.plots import RunRecord


def collect(paths: list[Path]) -> list[RunRecord]:
    """Completed compress-vit runs under ``paths`` that measured speed and FLOPs.

    Folders named ``<method><variant>-<level>`` (tokctl.vit.figures: ``diffrate300-at-tome-r12``)
    plot one line per variant, their points named by the rest of the folder name; others (a
    sweep's 0, 1, ...) one line per method, named by the settings that differ."""
    from tokctl.report import flatten, label_runs, load_config
    from tokctl.runs import find_runs, read_json, read_status

    records, named = [], {}
    for root in paths:
        for run in find_runs(root) if root.exists() else []:
            m = read_json(run / "metrics.json") or {}
            if read_status(run) != "completed" or "speedup" not in m or "gflops" not in m:
                continue
            cfg = flatten(load_config(run))
            head, _, rest = run.name.partition("-")
            method = str(m.get("method") or cfg.get("method.name"))
            if rest and head.startswith(method):
                cfg["method.name"] = head
                named[run] = f"{head}, {rest}"
            records.append(RunRecord(run, "compress-vit", "completed", cfg, m))
    label_runs(records)
    for r in records:
        r.label = named.get(r.path, r.label)
    return records


def tradeoff_figure(rows: list[RunRecord], out: Path) -> Path:
    from tokctl.plots import _pyplot, _save, draw_tradeoff, tradeoff_panels

    plt = _pyplot()
    panels = tradeoff_panels(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(7.0 * len(panels), 5.0), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        draw_tradeoff(ax, rows, panel)
    axes[0][0].legend(loc="best")
    fig.suptitle(f"compress-vit trade-offs: {len(rows)} runs", fontsize=12)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("tradeoff.png"))
    args = parser.parse_args(argv)
    rows = collect(args.runs)
    if not rows:
        print(f"error: no completed compress-vit run with speedup and gflops under "
              f"{', '.join(map(str, args.runs))}", file=sys.stderr)
        return 2
    print(tradeoff_figure(rows, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
