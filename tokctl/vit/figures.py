"""The compress-vit figures of the closing note, as run folders and one table.

    python -m tokctl.vit.figures default --out runs/vit-figures [--limit 5000] [--threads 1]
    python -m tokctl.vit.figures vitb --out runs/vit-figures [--threads 1]

``default``: every method at two compression levels (about 0.7 and 0.5 of the uncompressed
FLOPs) on the embedded default model and its test split, DiffRate searched at exactly ToMe's
FLOPs ratios for a same-FLOPs comparison. ``vitb``: a randomly initialised ViT-B/16 at 224x224,
batch 8, ToMe r=13, speed only. Each point is an ordinary `tokctl compress-vit` run; the table
(table.md), summary.json and the trade-off plot are written beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokctl.runs import atomic_write_json, atomic_write_text

TOME_LEVELS = (12, 20)


def tome_flops_ratio(r: int) -> float:
    from tokctl.vit import default_model, flops
    from tokctl.vit.methods.tome import ToMe
    from tokctl.vit.model import describe

    info = describe(default_model.build())
    method = ToMe(r=r)
    method.setup(info)
    full = flops.gflops(info, [(info.num_tokens, info.num_tokens)] * info.depth)
    return round(flops.gflops(info, method.planned_tokens(info)) / full, 4)


def default_plan() -> list[tuple[str, list[str]]]:
    plan = [(f"tome-r{r}", ["method=tome", f"method.r={r}"]) for r in TOME_LEVELS]
    plan += [(f"evit-k{k}", ["method=evit", f"method.keep_rate={k}"]) for k in (0.7, 0.5)]
    # A short search (150 steps) and the default one (300 steps, larger rate steps).
    plan += [(f"diffrate-at-tome-r{r}", ["method=diffrate", f"method.target_flops={tome_flops_ratio(r)}",
                                         "method.search.steps=150", "method.search.lr=0.05",
                                         "method.search.min_lr=0.005"]) for r in TOME_LEVELS]
    plan += [(f"diffrate300-at-tome-r{r}", ["method=diffrate", f"method.target_flops={tome_flops_ratio(r)}",
                                            "method.search.steps=300", "method.search.lr=0.1",
                                            "method.search.min_lr=0.01"]) for r in TOME_LEVELS]
    plan += [(f"cluster-{g}x{g}", ["method=cluster", f"method.clusters=[{g},{g}]", "method.cluster_after=1"])
             for g in (10, 8)]
    plan += [(f"tsm-k{k}", ["method=tsm", f"method.checkpoint=fashion-vit-tsm-k{k}.pt"]) for k in (0.75, 0.55)]
    return plan


def vitb_plan() -> list[tuple[str, list[str]]]:
    common = ["model=vit_b16_random", "data=synthetic", "data.num_images=96", "batch_size=8",
              "fidelity_images=8", "vis.images=2"]
    return [("vitb16-random-tome-r13", common + ["method=tome", "method.r=13"])]


KEYS = ("top1", "baseline_top1", "agreement", "speedup", "speedup_q25", "speedup_q75", "gflops",
        "baseline_gflops", "flops_ratio", "patch_feature_cosine")


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", choices=("default", "vitb"))
    parser.add_argument("--out", type=Path, default=Path("runs/vit-figures"))
    parser.add_argument("--limit", default="5000", help="test images per run (null: all 10,000)")
    parser.add_argument("--threads", default="1")
    parser.add_argument("--only", nargs="*", help="run only these labels")
    args = parser.parse_args(argv)

    from tokctl.errors import UserError
    from tokctl.jobs import JOBS, JobCrashed, run_single

    plan = default_plan() if args.plan == "default" else vitb_plan()
    if args.only:
        plan = [p for p in plan if p[0] in args.only]
    common = [f"threads={args.threads}"]
    if args.plan == "default":
        common.append(f"data.limit={args.limit}")
    results = {}
    summary_path = args.out / f"summary-{args.plan}.json"
    if summary_path.is_file():
        results = json.loads(summary_path.read_text())
    for label, overrides in plan:
        run_dir = args.out / label
        if (run_dir / "metrics.json").is_file():
            metrics = json.loads((run_dir / "metrics.json").read_text())
        else:
            try:
                run_single(JOBS["compress-vit"], common + overrides + [f"hydra.run.dir={run_dir}"])
            except (UserError, JobCrashed) as exc:
                print(f"{label}: {exc}", file=sys.stderr)
                continue
            metrics = json.loads((run_dir / "metrics.json").read_text())
        results[label] = {"overrides": overrides, **{k: metrics.get(k) for k in KEYS},
                          "tokens_per_layer": metrics.get("tokens_per_layer")}
        atomic_write_json(summary_path, results)
    lines = ["| run | " + " | ".join(KEYS) + " |", "|---" * (len(KEYS) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(_fmt(r[k]) for k in KEYS) + " |" for label, r in results.items()]
    table = "\n".join(lines) + "\n"
    atomic_write_text(args.out / f"table-{args.plan}.md", table)
    print(table)
    if args.plan == "default" and results:
        from tokctl.vit.plots import collect, tradeoff_figure

        rows = collect([args.out / label for label in results])
        if rows:
            print(tradeoff_figure(rows, args.out / "tradeoff-default.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
