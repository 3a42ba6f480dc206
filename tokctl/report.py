"""Reading run folders back: `tokctl runs ls | show | compare` and `tokctl report`.

Only the files of the run folders are read (config.yaml, env.json, status, metrics.json,
samples.jsonl), so a report can be made anywhere the folders are copied to. The runs become one
pandas table (:mod:`tokctl.runtable`); this module decides what of it to print, for an 80-column
terminal first: headline metrics before settings, settings as one wrapped label rather than a
column per config key, incomplete runs ranked apart, failed runs hidden unless ``--all``.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
from rich import box
from rich.table import Table

from tokctl import runtable as rt
from tokctl.console import console
from tokctl.errors import UserError
from tokctl.runs import atomic_write_text, find_runs, is_run_dir, read_json, read_status
from tokctl.runtable import command_of, fmt, load_config  # noqa: F401 - re-exported

# The headline keys of every command together (sweep.json's per-point metrics).
HEADLINE = tuple(dict.fromkeys(k for keys in rt.HEADLINE.values() for k in keys))
# The columns of a command's table in the report's summary.
REPORT_COLUMNS = {
    "decode": ("speedup", "speedup_iqr", "mean_accepted_tokens", "identical_to_baseline",
               "tokens_per_s", "baseline_tokens_per_s", "num_samples"),
    "compress-vit": ("top1", "baseline_top1", "agreement", "speedup", "speedup_iqr", "gflops",
                     "flops_ratio", "images_per_s"),
}


def flatten(d: Any) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    if not isinstance(d, dict) or not d:
        return {}
    return pd.json_normalize(d, sep=".").iloc[0].to_dict()


def scalar_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    if not metrics:
        return {}
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as plain Python values (NaN -> None) for --json."""
    return [{k: (None if rt._missing(v) else v) for k, v in row.items()}
            for row in df.astype(object).to_dict("records")]


def status_markup(status: str | None) -> str:
    colour = {"completed": "green", "running": "cyan", "failed": "red",
              "interrupted": "yellow"}.get(status or "", "white")
    return f"[{colour}]{status or '?'}[/]"


def _hidden_note(failed: int) -> str:
    return (f"{failed} failed run{'s' if failed != 1 else ''} hidden (--all shows them)"
            if failed else "")


# ---------------------------------------------------------------------------------- runs ls
def headline_text(command: str, metrics: dict[str, Any]) -> str:
    """``speedup=1.31x tok/step=1.92 identical=100%``: one word per metric, so a narrow
    terminal wraps between metrics, never inside one."""
    keys = [k for k in rt.HEADLINE.get(command, ()) if metrics.get(k) is not None]
    if not keys:
        keys = [k for k, v in scalar_metrics(metrics).items() if isinstance(v, (int, float))
                and not isinstance(v, bool)][:3]
    return " ".join(f"{rt.header(k).replace(' ', '_')}={fmt(metrics[k], k)}" for k in keys)


def runs_ls(root: Path, command: str | None = None, limit: int = 30, as_json: bool = False,
            show_all: bool = False, as_csv: bool = False) -> None:
    root = Path(root)
    if not root.exists():
        raise UserError(f"no runs folder at {root}; run a job first or pass the folder to search")
    command = rt.ALIASES.get(command, command) if command else None
    runs = [r for r in find_runs(root) if command is None or command_of(r) == command]
    failed = [r for r in runs if read_status(r) == "failed"]
    if not show_all:
        runs = [r for r in runs if r not in failed]
    runs = runs[:limit]
    rows = [rt.record(r) for r in runs]
    for row in rows:
        row["metrics"] = scalar_metrics(row["metrics"])
        row.pop("config")
    if as_json:
        _print_json(rows)
        return
    if as_csv:
        df = pd.json_normalize(rows, sep=".") if rows else pd.DataFrame()
        print(df.to_csv(index=False), end="")
        return
    hidden = "" if show_all else _hidden_note(len(failed))
    if not rows:
        console.print(f"no runs under {root}" + (f"; {hidden}" if hidden else ""))
        return
    _print_listing(root, rows, hidden)


def _print_listing(root: Path, rows: list[dict[str, Any]], hidden: str) -> None:
    """Runs grouped by the folder holding them (a sweep, a day), one line each; paths never
    wrap: a group's folder is printed once, above its runs, relative to ``root``."""
    groups: dict[Path, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(Path(row["path"]).parent, []).append(row)
    names = {id(r): Path(r["path"]).name for r in rows}
    width = {"status": max(len(r["status"] or "?") for r in rows),
             "n": max(len(str(r["n"])) for r in rows)}
    console.print(f"[bold]{len(rows)} run(s) under {root}[/], newest first"
                  + (f"; {hidden}" if hidden else ""))
    for parent, members in groups.items():
        try:
            where = parent.relative_to(root)
        except ValueError:
            where = parent
        kind = f"  [dim]sweep, {len(members)} shown[/]" if (parent / "sweep.json").is_file() else ""
        console.print(f"[bold cyan]{where}/[/]{kind}", soft_wrap=True)
        if all(Path(r["path"]).name.isdigit() for r in members):  # sweep points: grid order
            members = sorted(members, key=lambda r: (not Path(r["path"]).name.isdigit(),
                                                     int(Path(r["path"]).name)
                                                     if Path(r["path"]).name.isdigit() else 0))
        table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 1))
        # the names' width per folder: a sweep's points (0, 1, ...) leave the metrics more room
        table.add_column("run", no_wrap=True,
                         min_width=max(len(names[id(r)]) for r in members) + 2)
        table.add_column("status", no_wrap=True, min_width=width["status"])
        table.add_column("n", no_wrap=True, justify="right", min_width=width["n"] + 2)
        table.add_column("headline", ratio=1)
        for r in members:
            table.add_row("  " + names[id(r)], status_markup(r["status"]), f"n={r['n']}",
                          headline_text(r["command"], r["metrics"]))
        console.print(table)


# --------------------------------------------------------------------------------- runs show
def runs_show(run: Path, as_json: bool = False) -> None:
    run = Path(run)
    if not is_run_dir(run):
        raise UserError(f"{run} is not a run folder (no status and config.yaml inside)")
    metrics = read_json(run / "metrics.json") or {}
    env = read_json(run / "env.json") or {}
    error = (run / "error.txt").read_text() if (run / "error.txt").exists() else None
    row = rt.record(run)
    if as_json:
        _print_json({**row, "metrics": metrics, "env": env, "error": error})
        return
    command = row["command"]
    console.print(f"[bold]{run}[/]", soft_wrap=True)
    console.print(f"{command}  {status_markup(row['status'])}  n={row['n']}  "
                  f"({row['samples']} lines in samples.jsonl)")
    if error:
        console.print(f"[red]error:[/] {error.strip().splitlines()[-1]}", soft_wrap=True)
    head = [k for k in rt.HEADLINE.get(command, ()) if row["metrics"].get(k) is not None]
    if head:
        console.print("headline: " + headline_text(command, row["metrics"]), soft_wrap=True)
    flat = flatten({k: v for k, v in metrics.items() if k not in ("entries", "curves")})
    flat = {**{k: flat[k] for k in head if k in flat}, **flat}  # the headline first
    console.print(_key_values("metrics", flat))
    if isinstance(metrics.get("entries"), list) and metrics["entries"]:
        console.print(_entries_rich(metrics["entries"], metrics.get("curves") or {}))
    console.print(_key_values("config", flatten(load_config(run))))
    keys = ("time", "host", "torch_threads", "threads_reason", "cpus_available", "device",
            "dtype", "git_commit", "packages")
    console.print(_key_values("env", flatten({k: env[k] for k in keys if k in env})))


def _key_values(title: str, flat: dict[str, Any]) -> Table:
    """Two columns: keys whole (never cut; they are short enough), values folded."""
    table = Table(title=title, show_header=False, box=box.SIMPLE, title_justify="left",
                  pad_edge=False)
    table.add_column("key", style="cyan", no_wrap=True)
    table.add_column("value", overflow="fold")
    for k, v in flat.items():
        table.add_row(k, fmt(v, k.split(".")[-1]))
    return table


def _entries_rich(entries: list[dict[str, Any]], curves: dict[str, Any]) -> Table:
    """tokenize-image eval's entries: one row per codec and budget, rate-distortion order."""
    df = _entries_frame(entries)
    table = Table(title="rate-distortion (means over images)", box=box.SIMPLE,
                  title_justify="left", pad_edge=False)
    for col in df.columns:
        table.add_column(col, justify="left" if col == "codec" else "right", no_wrap=True)
    for row in df.itertuples(index=False):
        table.add_row(*row)
    for codec, pts in curves.items():
        if pts:
            table.caption = (table.caption or "") + (
                f"{codec}: {len(pts)} qualities swept, "
                f"{min(p['bytes_per_image'] for p in pts):.0f}-"
                f"{max(p['bytes_per_image'] for p in pts):.0f} bytes. ")
    return table


def _entries_frame(entries: list[dict[str, Any]], label: str | None = None) -> pd.DataFrame:
    """Entries as printable strings, sorted by byte budget then codec."""
    df = pd.DataFrame(entries)
    for col in ("tokens", "bytes_target", "over_budget", "ms_ssim", "rfid"):
        if col not in df.columns:
            df[col] = None
    df = df.sort_values(["bytes_target", "codec"], kind="stable", na_position="last")
    out = pd.DataFrame({
        "codec": df["codec"],
        "tokens": df["tokens"].map(lambda v: fmt(v, "tokens")),
        "target": df["bytes_target"].map(lambda v: fmt(v, "tokens")),
        "bytes": [fmt(b, "bytes_per_image") + (f" ({int(o)} over)" if not rt._missing(o) and o
                                               else "")
                  for b, o in zip(df["bytes_per_image"], df["over_budget"])],
        "SSIM": df["ssim"].map(lambda v: fmt(v, "ssim")),
        "PSNR dB": df["psnr"].map(lambda v: fmt(v, "psnr")),
        "MS-SSIM": df["ms_ssim"].map(lambda v: fmt(v, "ms_ssim")),
        "rFID": df["rfid"].map(lambda v: fmt(v, "rfid")),
    })
    if label is not None:
        out.insert(0, "run", label)
    return out.reset_index(drop=True)


# ------------------------------------------------------------------------------ runs compare
def runs_compare(paths: list[Path], metrics: list[str] | None = None, as_json: bool = False,
                 ascending: bool | None = None, show_all: bool = False,
                 as_csv: bool = False) -> None:
    df = rt.frame(rt.runs_in(paths))
    commands = sorted(set(df["command"]))
    if len(commands) > 1:
        raise UserError(f"these runs come from different commands ({', '.join(commands)}); "
                        f"compare runs of one command at a time")
    command = commands[0]
    failed = int((df["group"] == rt.FAILED).sum())
    if not show_all:
        df = df[df["group"] != rt.FAILED]
    if df.empty:
        raise UserError(f"every run there failed; {_hidden_note(failed)}")
    if metrics:
        shown = list(metrics)
        missing = [m for m in shown if not rt.present(df, "metrics", m)]
        if missing:
            raise UserError(f"no run has metric(s) {', '.join(missing)}; "
                            f"see `tokctl runs show RUN` for the metrics a run has")
    else:
        shown = rt.headline_metrics(df, command)
    by = shown[0] if shown else None
    if ascending is None and by:
        ascending = rt.lower_is_better(by)
    df = rt.rank(df, by, ascending, then=shown[1:])
    df = df.assign(label=rt.labels(df))
    settings = rt.Settings.of(rt.configs(df)).columns()
    if as_json:
        _print_json([{"path": r["path"], "command": r["command"], "status": r["status"],
                      "samples": r["samples"], "n": r["n"], "rank": r["rank"],
                      "incomplete": r["group"] == rt.INCOMPLETE, "label": r["label"],
                      "rank_by": by,
                      "config": {k: r.get(f"config.{k}") for k in settings},
                      "metrics": {m: r.get(f"metrics.{m}") for m in shown}}
                     for r in _records(df)])
        return
    if as_csv:
        out = df[["rank", "path", "status", "n", "label"]].copy()
        for k in settings:
            out[k] = rt.column(df, "config", k)
        for c in df.columns:  # every scalar metric, the shown ones first
            if c.startswith("metrics.") and df[c].map(rt._is_scalar).all():
                out[c[len("metrics."):]] = df[c]
        out = out[list(out.columns[:5 + len(settings)]) + shown
                  + [c for c in out.columns[5 + len(settings):] if c not in shown]]
        print(out.to_csv(index=False), end="")
        return
    _print_compare(df, command, shown, by, ascending, failed if not show_all else 0)


def _print_compare(df: pd.DataFrame, command: str, shown: list[str], by: str | None,
                   ascending: bool | None, hidden_failed: int) -> None:
    parent = rt.common_parent(list(df["path"]))
    order = "" if not by else f", ranked by {rt.header(by)} " + (
        "(lowest first)" if ascending else "(highest first)") + (
        ", ties by the next columns" if len(shown) > 1 else "")
    title = f"{len(df)} {command} runs in {parent}{order}"
    rows = _records(df)
    with_status = (df["group"] != rt.COMPLETE).any()
    for r in rows:
        r["#"] = str(r["rank"]) if r["rank"] is not None else "-"
        try:
            r["where"] = str(Path(r["path"]).absolute().relative_to(Path(parent).absolute()))
        except ValueError:
            r["where"] = rt.short_path(r["path"])
        r["cells"] = [fmt(r.get(f"metrics.{m}"), m) for m in shown]
    widths = [max(len(rt.header(m)), *(len(r["cells"][i]) for r in rows)) + 2
              for i, m in enumerate(shown)]
    # the settings column at least as wide as its longest word (``keep_rate=0.7``), so a
    # setting folds only where it is longer than 28 characters
    words = max((len(w) for r in rows for w in r["label"].split()), default=8)
    settings_width = max(12, min(words, 28))
    # The metrics need their room whole; a terminal too narrow for them and a usable settings
    # column (too many -k) gets one block per run instead of a table.
    console.print(f"[bold]{title}[/]")
    others = sum(widths) + 3 + 2 + max(len(str(r["n"])) for r in rows)
    settings_width = min(settings_width, max(12, console.width - others))
    if others + 12 > console.width:
        for r in rows:
            status = "" if r["group"] == rt.COMPLETE else f"  {status_markup(r['status'])}"
            console.print(f"[bold]#{r['#']} {r['label']}[/]  [dim](run {r['where']}, "
                          f"n={r['n']})[/]{status}")
            key_width = max(len(rt.header(m)) for m in shown)
            for m, cell in zip(shown, r["cells"]):
                console.print(f"    {rt.header(m):<{key_width}}  {cell}")
    else:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
        table.add_column("#", justify="right", no_wrap=True)
        for m in shown:
            table.add_column(rt.header(m), justify="right", no_wrap=True)
        table.add_column("n", justify="right", no_wrap=True)
        # the run's folder in a column of its own where that leaves the settings their room,
        # else under the settings
        where_width = max(len(r["where"]) for r in rows)
        apart = others + 2 + where_width + settings_width <= console.width
        table.add_column("settings" if apart else "settings / run", ratio=1,
                         min_width=settings_width, overflow="fold")
        if apart:
            table.add_column("run", no_wrap=True, min_width=where_width)
        last_group = None
        for r in rows:
            if last_group is not None and r["group"] != last_group:
                table.add_section()
            last_group = r["group"]
            # a run not completed says so after its name: no status column for the few
            label = r["label"] + ("" if r["group"] == rt.COMPLETE
                                  else f" ({status_markup(r['status'])})")
            cells = [r["#"], *r["cells"], str(r["n"])]
            cells += [label, r["where"]] if apart else [f"{label}\n[dim]{r['where']}[/]"]
            table.add_row(*cells, style=None if r["group"] == rt.COMPLETE else "dim")
        console.print(table)
    notes = [rt.METRICS[m].note for m in shown if m in rt.METRICS and rt.METRICS[m].note]
    notes.append(f"n: {rt.SIZE_NAMES.get(command, 'samples')} per run")
    if with_status:
        apart = sorted(set(df.loc[df["group"] != rt.COMPLETE, "status"].fillna("no status")))
        notes.append(f"-: not completed ({', '.join(apart)}), so partial metrics: ranked apart")
    if hidden_failed:
        notes.append(_hidden_note(hidden_failed))
    if command == "tokenize-image eval":
        notes.append("eval metrics: the first tokenizer at its full token count "
                     "(-k CODEC@TOKENS.ssim for others)")
    console.print("[dim]" + "\n".join(notes) + "[/]")


# ------------------------------------------------------------------------------------ report
def load_records(paths: list[Path], df: pd.DataFrame | None = None):
    """The runs as :class:`~tokctl.plots.RunRecord` (config flat, metrics nested), grid order."""
    from tokctl.plots import RunRecord

    if df is None:
        df = rt.frame(rt.runs_in(paths))
    df = rt.grid_order(df)
    out = []
    for path, command, status in zip(df["path"], df["command"], df["status"]):
        run = Path(path)
        metrics = read_json(run / "metrics.json") or {}
        out.append(RunRecord(path=run, command=command, status=status,
                             config=flatten(load_config(run)), metrics=metrics))
    return out


def label_runs(records) -> None:
    """Name each run by the settings that set it apart (``tome, r=8``); the folder otherwise."""
    if not records:
        return
    df = pd.json_normalize([{"path": str(r.path), "config": r.config or {}} for r in records],
                           sep=".")
    for r, label in zip(records, rt.labels(df)):
        r.label = label


def expand_also(runs):
    """A decode run with ``also=[...]`` measured several methods against one baseline,
    interleaved: each becomes a record of its own (``metrics["also"][name]``)."""
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


def write_report(paths: list[Path], out: Path, as_json: bool = False) -> dict[str, Any]:
    from tokctl.plots import PLOTTERS

    df = rt.frame(rt.runs_in(paths))
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the report folder {out}: {exc.strerror or exc}") from None
    md = ["# tokctl report", "",
          f"{len(df)} run(s) from {', '.join(f'`{p}`' for p in paths)}; written "
          f"{_dt.datetime.now().isoformat(timespec='minutes')} by "
          f"`tokctl report {' '.join(str(p) for p in paths)} --out {out}`.", ""]
    written: list[dict[str, Any]] = []
    for command, group in df.groupby("command", sort=True):
        runs = load_records(paths, group)
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
        others = [r for r in runs if r not in done and r.status != "failed"]
        failed = [r for r in runs if r.status == "failed"]
        if others:
            md += ["Not plotted (not completed): " + ", ".join(
                f"`{r.path}` ({r.status or 'no status'})" for r in others), ""]
        if failed:
            md += [f"Left out: {len(failed)} failed run(s) (their `error.txt` says why): "
                   + ", ".join(f"`{r.path}`" for r in failed), ""]
    md_path = out / "report.md"
    atomic_write_text(md_path, "\n".join(md).rstrip() + "\n")
    result = {"out": str(out), "markdown": str(md_path), "figures": written,
              "runs": len(df), "commands": sorted(set(df["command"]))}
    if as_json:
        _print_json(result)
    else:
        for w in written:
            console.print(f"[green]wrote[/] {w['file']}  [dim]{w['command']}: {w['title']}[/]",
                          soft_wrap=True)
        console.print(f"[green]wrote[/] {md_path}", soft_wrap=True)
    return result


def _summary_table(command: str, runs) -> list[str]:
    """The report's table of a command's completed runs, best first, named by their settings."""
    if not runs:
        return []
    if isinstance(runs[0].metrics.get("entries"), list) and runs[0].metrics["entries"]:
        return _entries_table(runs)
    df = pd.json_normalize([{"run": r.label, "folder": f"`{rt.short_path(r.path)}`",
                             **{k: v for k, v in r.metrics.items() if k != "per_category"},
                             "speedup_iqr": _iqr(r.metrics)}
                            for r in runs], sep=".")
    wanted = REPORT_COLUMNS.get(command) or rt.HEADLINE.get(command) or ()
    columns = [c for c in wanted if c in df.columns and df[c].notna().any()]
    if not columns:
        columns = [c for c in df.columns if c not in ("run", "folder")
                   and df[c].map(lambda v: isinstance(v, (int, float)) and not
                                 isinstance(v, bool)).all()][:6]
    # best first by the first column, ties by the next ones (as `runs compare`)
    keys = {f"_key{i}": (rt.numeric(df[c]) if rt.lower_is_better(c) else -rt.numeric(df[c]))
            for i, c in enumerate(columns) if c != "speedup_iqr"}
    if keys:
        df = df.assign(**keys).sort_values(list(keys), na_position="last", kind="stable")
    table = pd.DataFrame({"run": df["run"]})
    for c in columns:
        table[_md_header(c)] = df[c].map(lambda v, c=c: fmt(v, c))
    table["folder"] = df["folder"]
    return [table.to_markdown(index=False, disable_numparse=True,
                              colalign=["left"] + ["right"] * len(columns) + ["left"]), ""]


def _iqr(metrics: dict[str, Any]) -> str | None:
    """The per-sample speedup's interquartile range, ``1.21-1.50x`` (old compress-vit runs
    name its ends speedup_q1/q3)."""
    lo = metrics.get("speedup_q25", metrics.get("speedup_q1"))
    hi = metrics.get("speedup_q75", metrics.get("speedup_q3"))
    if not isinstance(lo, (int, float)) or not isinstance(hi, (int, float)):
        return None
    return f"{lo:.2f}-{hi:.2f}x"


def _md_header(key: str) -> str:
    return "speedup IQR" if key == "speedup_iqr" else rt.header(key)


def _entries_table(runs) -> list[str]:
    """tokenize-image eval: one row per codec and budget."""
    table = pd.concat([_entries_frame(r.metrics["entries"], r.label) for r in runs],
                      ignore_index=True)
    return [table.to_markdown(index=False, disable_numparse=True,
                              colalign=["left", "left"] + ["right"] * 7), "",
            "(target: the byte budget a codec was held to; over: images a classical codec could "
            "not bring under the target even at its lowest quality, counted at their real size)",
            ""]
