"""Reading run folders back: `tokctl runs ls | show | compare` and `tokctl report`.

Only the files of the run folders are read (config.yaml, env.json, status, metrics.json,
samples.jsonl), so a report can be made anywhere the folders are copied to.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from rich.table import Table

from tokctl.console import console
from tokctl.errors import UserError
from tokctl.runs import (atomic_write_text, find_runs, is_run_dir, read_json, read_samples,
                         read_status)

# Metrics shown first when present; any other scalar metric follows.
HEADLINE = ("speedup", "tokens_per_s", "baseline_tokens_per_s", "mean_accepted_tokens",
            "identical_to_baseline", "top1", "agreement", "images_per_s", "gflops", "ssim", "psnr")
# Ranking puts the largest first, except for these.
LOWER_IS_BETTER = ("gflops", "flops_ratio", "time_s", "baseline_time_s", "kl", "rfid", "loss",
                   "val_loss", "bytes_per_image", "failed_samples", "num_skipped")
# Config keys that differ between runs without making them different experiments.
NOT_A_SETTING = ("name", "runs_dir")
# The columns of a command's table in the report's summary.
REPORT_COLUMNS = {
    "decode": ("speedup", "speedup_median", "tokens_per_s", "baseline_tokens_per_s",
               "mean_accepted_tokens", "identical_to_baseline", "num_samples"),
    "compress-vit": ("top1", "baseline_top1", "agreement", "speedup", "images_per_s", "gflops",
                     "flops_ratio"),
}


def load_config(run: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    path = run / "config.yaml"
    if not path.is_file():
        return {}
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as exc:  # noqa: BLE001 - a damaged config must not hide the rest: say so
        from rich.markup import escape

        from tokctl.console import err_console
        from tokctl.errors import one_line_error

        err_console.print(f"[yellow]warning[/]: {escape(str(path))} is damaged, its settings are "
                          f"left out ({escape(one_line_error(exc))})", soft_wrap=True)
        return {}


def command_of(run: Path) -> str:
    env = read_json(run / "env.json") or {}
    if env.get("command"):
        return env["command"]
    from tokctl.jobs import JOBS

    folders = {job.run_folder_name: job.command for job in JOBS.values()}
    return next((folders[p] for p in reversed(run.parts) if p in folders), run.parent.parent.name)


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
    if isinstance(v, (list, dict)):
        return json.dumps(v)
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
        runs.extend(r for r in found if r not in runs)
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


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def status_markup(status: str | None) -> str:
    colour = {"completed": "green", "running": "cyan", "failed": "red",
              "interrupted": "yellow"}.get(status or "", "white")
    return f"[{colour}]{status or '?'}[/]"


# ---------------------------------------------------------------------------- runs ls / show
def runs_ls(root: Path, command: str | None = None, limit: int = 30, as_json: bool = False) -> None:
    if not Path(root).exists():
        raise UserError(f"no runs folder at {root}; run a job first or pass the folder to search")
    runs = [r for r in find_runs(root) if command is None or command_of(r) == command][:limit]
    rows = [run_summary(r) for r in runs]
    if as_json:
        _print_json(rows)
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


def runs_show(run: Path, as_json: bool = False) -> None:
    run = Path(run)
    if not is_run_dir(run):
        raise UserError(f"{run} is not a run folder (no status and config.yaml inside)")
    metrics = read_json(run / "metrics.json") or {}
    env = read_json(run / "env.json") or {}
    error = (run / "error.txt").read_text() if (run / "error.txt").exists() else None
    if as_json:
        _print_json({**run_summary(run), "metrics": metrics, "env": env,
                     "config": load_config(run), "error": error})
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
    table.add_column("value", overflow="fold")
    for k, v in flatten(metrics).items():
        table.add_row(k, fmt(v))
    console.print(table)
    keys = ("torch_threads", "packages", "git_commit", "cpus_available", "device", "dtype")
    console.print("env: " + ", ".join(f"{k}={env[k]}" for k in keys if k in env), soft_wrap=True)
    if error:
        console.print(f"[red]error:[/] {error.strip().splitlines()[-1]}")


# ------------------------------------------------------------------------------ runs compare
def varying_keys(configs: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for cfg in configs:
        for k in cfg:
            if k not in keys:
                keys.append(k)
    return [k for k in keys if k not in NOT_A_SETTING and not k.endswith("_target_")
            and len({json.dumps(c.get(k), default=str, sort_keys=True) for c in configs}) > 1]


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def rank(rows: list[tuple[dict, dict, dict]], metric: str, ascending: bool | None = None):
    """Rows (summary, config, flat metrics) best first by ``metric``; runs without it last."""
    if ascending is None:
        ascending = metric.split(".")[-1] in LOWER_IS_BETTER
    sign = 1.0 if ascending else -1.0
    return sorted(rows, key=lambda row: (_num(row[2].get(metric)) is None,
                                         sign * (_num(row[2].get(metric)) or 0.0)))


def runs_compare(paths: list[Path], metrics: list[str] | None = None, as_json: bool = False,
                 ascending: bool | None = None) -> None:
    runs = sorted(_runs_from(paths), key=_path_order)  # ties keep the grid's order
    summaries = [run_summary(r) for r in runs]
    commands = {s["command"] for s in summaries}
    if len(commands) > 1:
        raise UserError(f"these runs come from different commands ({', '.join(sorted(commands))}); "
                        f"compare runs of one command at a time")
    configs = [flatten(load_config(r)) for r in runs]
    flat_metrics = [flatten(read_json(r / "metrics.json") or {}) for r in runs]
    varying = Settings.of(configs).columns()
    if metrics:
        shown = list(metrics)
        missing = [m for m in shown if not any(m in fm for fm in flat_metrics)]
        if missing:
            raise UserError(f"no run has metric(s) {', '.join(missing)}; "
                            f"see `tokctl runs show RUN` for the metrics a run has")
    else:
        present = {k for s in summaries for k in s["metrics"]}
        shown = ([k for k in HEADLINE if k in present] or sorted(present))[:4]
    rows = list(zip(summaries, configs, flat_metrics))
    by = shown[0] if shown else None
    if by:
        rows = rank(rows, by, ascending)
    if as_json:
        _print_json([{**s, "rank_by": by, "config": {k: c.get(k) for k in varying},
                      "metrics": {m: fm.get(m) for m in shown}} for s, c, fm in rows])
        return
    order = "" if not by else (" (lowest first)" if (ascending if ascending is not None else
                                                      by.split(".")[-1] in LOWER_IS_BETTER)
                               else " (highest first)")
    table = Table(title=f"{len(runs)} runs of {next(iter(commands))}"
                        + (f", ranked by {by}{order}" if by else ""))
    table.add_column("#", justify="right")
    table.add_column("run", no_wrap=True, overflow="ellipsis")
    table.add_column("status", no_wrap=True)
    for k in varying:  # values are never cut: headers fold instead
        table.add_column(k, style="cyan", overflow="fold",
                         min_width=min(24, max(len(fmt(c.get(k))) for _, c, _ in rows)))
    for m in shown:
        table.add_column(m, justify="right", overflow="fold",
                         min_width=max(len(fmt(fm.get(m))) for _, _, fm in rows))
    for i, (s, c, fm) in enumerate(rows, 1):
        table.add_row(str(i), _short_path(Path(s["path"])), status_markup(s["status"]),
                      *[fmt(c.get(k)) for k in varying], *[fmt(fm.get(m)) for m in shown])
    console.print(table)


def _short_path(run: Path) -> str:
    """The folder name, with its sweep's when it is a sweep point (``10-02-03_sweep/3``)."""
    return f"{run.parent.name}/{run.name}" if run.name.isdigit() else run.name


# ------------------------------------------------------------------------------------ report
def load_records(paths: list[Path]):
    from tokctl.plots import RunRecord

    records = [RunRecord(path=r, command=command_of(r), status=read_status(r),
                         config=flatten(load_config(r)), metrics=read_json(r / "metrics.json") or {})
               for r in _runs_from(paths)]
    return sorted(records, key=lambda r: _path_order(r.path))


def _path_order(run: Path) -> tuple:
    """Sweep points in their grid's order (2 before 10), other runs by folder name (time)."""
    return (str(run.parent), int(run.name) if run.name.isdigit() else -1, run.name)


@dataclass
class Settings:
    """The config keys that tell runs apart. A key only some runs have (a method's own option)
    counts only where it differs between runs of that same method: ``recycling`` against
    ``lookup`` needs no more words than their names."""

    keys: list[str]  # names first, then the methods' own options, then the rest
    names: list[str]  # method.name and the like
    shared: list[str]  # differing keys every run has
    own: dict[tuple, list[str]]  # per kind of run (its names): its options that differ

    @classmethod
    def of(cls, configs: list[dict[str, Any]]) -> "Settings":
        keys = varying_keys(configs)
        names = [k for k in keys if k.endswith(".name") or k == "method"]
        groups = tuple(k[: -len("name")] for k in names if k.endswith(".name"))  # "method."
        keys.sort(key=lambda k: 0 if k in names else 1 if k.startswith(groups) else 2)
        shared = [k for k in keys if all(c.get(k) is not None for c in configs)]
        settings = cls(keys, names, shared, {})
        for kind in {settings.kind(c) for c in configs}:
            members = [c for c in configs if settings.kind(c) == kind]
            settings.own[kind] = [k for k in varying_keys(members) if k not in shared]
        return settings

    def kind(self, config: dict[str, Any]) -> tuple:
        return tuple(str(config.get(k)) for k in self.names)

    def of_run(self, config: dict[str, Any]) -> list[str]:
        own = self.own.get(self.kind(config), [])
        return [k for k in self.keys if k in self.shared or k in own]

    def columns(self) -> list[str]:
        own = {k for ks in self.own.values() for k in ks}
        return [k for k in self.keys if k in self.shared or k in own]


def label_runs(records) -> None:
    """Name each run by the settings that set it apart (``tome, r=8``); the folder otherwise."""
    settings = Settings.of([r.config for r in records])
    counts: dict[str, int] = {}
    for r in records:
        shown = settings.of_run(r.config)
        last = [k.split(".")[-1] for k in shown]
        parts = []
        for k, short in zip(shown, last):
            v = r.config.get(k)
            if v is None:  # a setting this run's method does not have
                continue
            if k in settings.names:
                parts.append(str(v))
            else:
                parts.append(f"{short if last.count(short) == 1 else k}={_short_value(v)}")
        label = ", ".join(parts) or _short_path(r.path)
        counts[label] = counts.get(label, 0) + 1
        r.label = label if counts[label] == 1 else f"{label} #{counts[label]}"


def expand_also(runs):
    """A decode run with ``also=[...]`` measured several methods against one baseline,
    interleaved: each becomes a record of its own (``metrics["also"][name]``)."""
    from dataclasses import replace

    from tokctl.plots import RunRecord

    out, many = [], len(runs) > 1
    for r in runs:
        extra = r.metrics.get("also") or {}
        if not extra:
            out.append(r)
            continue
        tag = f" [{r.label}]" if many else ""
        out.append(replace(r, label=f"{r.metrics.get('method') or r.label}{tag}"))
        for name, m in extra.items():
            out.append(RunRecord(r.path, r.command, r.status, r.config,
                                 {**m, "baseline": r.metrics.get("baseline")}, f"{name}{tag}"))
    return out


def _short_value(v: Any) -> str:
    """A path shown by its last two parts: the label of a run, not its address."""
    text = fmt(v)
    if isinstance(v, str) and "/" in v.strip("/"):
        return "/".join(Path(v).parts[-2:])
    return text


def write_report(paths: list[Path], out: Path, as_json: bool = False) -> dict[str, Any]:
    from tokctl.plots import PLOTTERS

    records = load_records(paths)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the report folder {out}: {exc.strerror or exc}") from None
    by_command: dict[str, list] = {}
    for r in records:
        by_command.setdefault(r.command, []).append(r)
    md = ["# tokctl report", "",
          f"{len(records)} run(s) from {', '.join(f'`{p}`' for p in paths)}; written "
          f"{_dt.datetime.now().isoformat(timespec='minutes')} by "
          f"`tokctl report {' '.join(str(p) for p in paths)} --out {out}`.", ""]
    written: list[dict[str, Any]] = []
    for command, runs in sorted(by_command.items()):
        done = [r for r in runs if r.status == "completed" and r.metrics]
        label_runs(done)
        if command == "decode":
            done = expand_also(done)
        md += [f"## {command}: {len(runs)} run(s)", ""]
        plotter = PLOTTERS.get(command)
        figures = plotter(done, out) if plotter and done else []
        for f in figures:
            md += [f"![{f.title}]({f.file})", "", f"**{f.title}.** {f.shows}", ""]
            written.append({"command": command, "file": str(out / f.file), "title": f.title})
        if not figures:
            md += ["(no plot for this command" + ("" if done else ": no completed run") + ")", ""]
        md += _summary_table(command, done)
        others = [r for r in runs if r not in done]
        if others:
            md += ["Not plotted (not completed): " + ", ".join(
                f"`{r.path}` ({r.status or 'no status'})" for r in others), ""]
    md_path = out / "report.md"
    atomic_write_text(md_path, "\n".join(md).rstrip() + "\n")
    result = {"out": str(out), "markdown": str(md_path), "figures": written,
              "runs": len(records), "commands": sorted(by_command)}
    if as_json:
        _print_json(result)
    else:
        for w in written:
            console.print(f"[green]wrote[/] {w['file']}  [dim]{w['command']}: {w['title']}[/]",
                          soft_wrap=True)
        console.print(f"[green]wrote[/] {md_path}", soft_wrap=True)
    return result


def _summary_table(command: str, runs) -> list[str]:
    if not runs:
        return []
    if runs[0].metrics.get("entries") and isinstance(runs[0].metrics["entries"], list):
        return _entries_table(runs)
    columns = [c for c in REPORT_COLUMNS.get(command, HEADLINE)
               if any(r.metrics.get(c) is not None for r in runs)]
    if not columns:
        columns = sorted({k for r in runs for k in scalar_metrics(r.metrics)})[:6]
    by = columns[0] if columns else None
    rows = [(None, r, flatten(r.metrics)) for r in runs]
    if by:
        rows = rank(rows, by)
    lines = ["| run | " + " | ".join(columns) + " | folder |",
             "|---|" + "---:|" * len(columns) + "---|"]
    for _, r, fm in rows:
        lines.append(f"| {r.label} | " + " | ".join(fmt(fm.get(c)) for c in columns)
                     + f" | `{_short_path(r.path)}` |")
    return lines + [""]


def _entries_table(runs) -> list[str]:
    """tokenize-image eval: one row per codec and budget."""
    lines = ["| run | codec | tokens | target bytes | bytes/image | images over | SSIM | "
             "PSNR (dB) | MS-SSIM | rFID |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        for e in sorted(r.metrics["entries"], key=lambda e: (e.get("bytes_target") or 0,
                                                             str(e.get("codec")))):
            lines.append(f"| {r.label} | {e.get('codec')} | {fmt(e.get('tokens'))} | "
                         f"{fmt(e.get('bytes_target'))} | {fmt(e.get('bytes_per_image'))} | "
                         f"{fmt(e.get('over_budget'))} | {fmt(e.get('ssim'))} | "
                         f"{fmt(e.get('psnr'))} | {fmt(e.get('ms_ssim'))} | {fmt(e.get('rfid'))} |")
    return lines + ["", "(images over: images a classical codec could not bring under the "
                        "target even at its lowest quality; counted at their real size)", ""]
