"""Reading run folders back: `tokctl runs ls | show | compare`. Only the run files are read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from rich.table import Table

from tokctl.console import console
from tokctl.errors import UserError
from tokctl.runs import find_runs, is_run_dir, read_json, read_samples, read_status

# Metrics shown first when present, per command; any other scalar metric follows.
HEADLINE = ("speedup", "tokens_per_s", "baseline_tokens_per_s", "mean_accepted_tokens",
            "identical_to_baseline", "top1", "agreement", "images_per_s", "gflops", "ssim", "psnr")


def load_config(run: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=False)
    except Exception:  # noqa: BLE001 - a damaged config should not hide the rest
        return {}


def command_of(run: Path) -> str:
    env = read_json(run / "env.json") or {}
    return env.get("command") or run.parent.parent.name


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def scalar_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    if not metrics:
        return {}
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000 or abs(v) < 0.01:
            return f"{v:.3g}"
        return f"{v:.3f}".rstrip("0").rstrip(".")
    return str(v)


def _runs_from(paths: Iterable[Path]) -> list[Path]:
    runs: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise UserError(f"no such run folder: {p}")
        found = find_runs(p)
        if not found:
            raise UserError(f"{p} holds no run folder (no status and config.yaml inside)")
        runs.extend(found)
    return runs


def run_summary(run: Path) -> dict[str, Any]:
    metrics = read_json(run / "metrics.json") or {}
    return {
        "path": str(run),
        "command": command_of(run),
        "status": read_status(run),
        "samples": len(read_samples(run)),
        "metrics": scalar_metrics(metrics),
    }


def runs_ls(root: Path, command: str | None = None, limit: int = 30, as_json: bool = False) -> None:
    if not Path(root).exists():
        raise UserError(f"no runs folder at {root}; run a job first or pass the folder to search")
    runs = [r for r in find_runs(root) if command is None or command_of(r) == command][:limit]
    rows = [run_summary(r) for r in runs]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"runs under {root}", show_lines=False)
    for col in ("run", "command", "status", "samples", "headline"):
        table.add_column(col, overflow="fold")
    for row in rows:
        m = row["metrics"]
        head = ", ".join(f"{k}={fmt(m[k])}" for k in HEADLINE if k in m)[:80]
        table.add_row(row["path"], row["command"], status_markup(row["status"]),
                      str(row["samples"]), head)
    console.print(table)


def status_markup(status: str | None) -> str:
    colour = {"completed": "green", "running": "cyan", "failed": "red",
              "interrupted": "yellow"}.get(status or "", "white")
    return f"[{colour}]{status or '?'}[/]"


def runs_show(run: Path, as_json: bool = False) -> None:
    run = Path(run)
    if not is_run_dir(run):
        raise UserError(f"{run} is not a run folder (no status and config.yaml inside)")
    metrics = read_json(run / "metrics.json") or {}
    env = read_json(run / "env.json") or {}
    error = (run / "error.txt").read_text() if (run / "error.txt").exists() else None
    if as_json:
        print(json.dumps({**run_summary(run), "metrics": metrics, "env": env,
                          "config": load_config(run), "error": error}, indent=2))
        return
    console.print(f"[bold]{run}[/]  {status_markup(read_status(run))}  "
                  f"{len(read_samples(run))} samples")
    cfg = flatten(load_config(run))
    table = Table(title="config", show_header=False)
    table.add_column("key", style="cyan")
    table.add_column("value", overflow="fold")
    for k, v in cfg.items():
        table.add_row(k, fmt(v))
    console.print(table)
    table = Table(title="metrics", show_header=False)
    table.add_column("metric", style="cyan")
    table.add_column("value")
    for k, v in flatten(metrics).items():
        table.add_row(k, fmt(v))
    console.print(table)
    keys = ("torch_threads", "packages", "git_commit", "cpus_available", "device", "dtype")
    console.print("env: " + ", ".join(f"{k}={env[k]}" for k in keys if k in env), soft_wrap=True)
    if error:
        console.print(f"[red]error:[/] {error.strip().splitlines()[-1]}")


def varying_keys(configs: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for cfg in configs:
        for k in cfg:
            if k not in keys:
                keys.append(k)
    return [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs}) > 1]


def runs_compare(paths: list[Path], metrics: list[str] | None = None, as_json: bool = False) -> None:
    runs = _runs_from(paths)
    configs = [flatten(load_config(r)) for r in runs]
    summaries = [run_summary(r) for r in runs]
    commands = {s["command"] for s in summaries}
    if len(commands) > 1:
        raise UserError(f"these runs come from different commands ({', '.join(sorted(commands))}); "
                        f"compare runs of one command at a time")
    varying = [k for k in varying_keys(configs) if k not in ("name",)]
    if metrics:
        shown = list(metrics)
        missing = [m for m in shown if not any(m in s["metrics"] for s in summaries)]
        if missing:
            raise UserError(f"no run has metric(s) {', '.join(missing)}; "
                            f"see `tokctl runs show RUN` for the metrics a run has")
    else:
        present = {k for s in summaries for k in s["metrics"]}
        shown = [k for k in HEADLINE if k in present] or sorted(present)[:6]
    rank = shown[0] if shown else None
    if rank:
        summaries_cfgs = sorted(zip(summaries, configs),
                                key=lambda sc: (sc[0]["metrics"].get(rank) is None,
                                                -_num(sc[0]["metrics"].get(rank))))
    else:
        summaries_cfgs = list(zip(summaries, configs))
    if as_json:
        print(json.dumps([{**s, "config": {k: c.get(k) for k in varying}} for s, c in summaries_cfgs],
                         indent=2, default=str))
        return
    table = Table(title=f"{len(runs)} runs" + (f", ranked by {rank}" if rank else ""))
    table.add_column("run", overflow="fold")
    table.add_column("status")
    for k in varying:
        table.add_column(k, style="cyan", overflow="fold")
    for m in shown:
        table.add_column(m, justify="right")
    for s, c in summaries_cfgs:
        table.add_row(Path(s["path"]).name, status_markup(s["status"]),
                      *[fmt(c.get(k)) for k in varying], *[fmt(s["metrics"].get(m)) for m in shown])
    console.print(table)


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("-inf")
