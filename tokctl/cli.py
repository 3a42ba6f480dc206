"""The `tokctl` command line: one thin command per job; the work happens in tokctl.jobs."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from tokctl.console import console, err_console
from tokctl.errors import UserError
from tokctl.jobs import JOBS, Job

app = typer.Typer(
    name="tokctl",
    help="Experiments on tokens: speculative and sparse LLM decoding (decode), ViT token "
         "compression (compress-vit) and discrete image tokenizers (tokenize-image). "
         "Each job takes Hydra overrides (key=value, group=option, +key=value; -m for a sweep) "
         "and writes a run folder under runs/.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

JOB_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True,
               "help_option_names": []}


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True, markup=True)
    raise typer.Exit(code)


def _jobs_of(top: str) -> dict[str, Job]:
    """Jobs reachable from one top-level command, keyed by action ('' for the default)."""
    out = {}
    for name, job in JOBS.items():
        head, _, action = name.partition(" ")
        if head == top:
            out[action] = job
    return out


def describe(job: Job) -> str:
    """--help for a job: its groups and options, read from conf/, and its top-level keys."""
    from omegaconf import OmegaConf

    from tokctl.config import conf_dir, groups

    lines = [f"[bold]tokctl {job.command}[/] [dim][OVERRIDES...] [-m][/]", "", job.summary, ""]
    primary = conf_dir(job.conf) / f"{job.config_name}.yaml"
    raw = OmegaConf.load(primary)
    defaults = {}
    for item in raw.get("defaults", []) or []:
        if isinstance(item, str) or item is None:
            continue
        for k, v in item.items():
            defaults[str(k).split("@")[0].lstrip("/")] = v
    lines.append("[bold]Config groups[/] (choose with group=option; default in bold):")
    for group, options in groups(job.conf).items():
        if group.startswith("hydra") or group not in defaults:
            continue
        shown = ", ".join(f"[bold green]{o}[/]" if o == defaults.get(group) else o for o in options)
        lines.append(f"  [cyan]{group}[/]: {shown}")
    lines += ["", "[bold]Top-level keys[/] (key=value):"]
    for key, value in OmegaConf.to_container(raw, resolve=False).items():
        if key in ("defaults", "hydra") or isinstance(value, (dict, list)):
            continue
        lines.append(f"  [cyan]{key}[/]={value}")
    lines += ["", "Group members are set with [cyan]group.key=value[/] (e.g. method.k=8); "
              "add new keys with [cyan]+key=value[/]; [cyan]-m[/] sweeps comma-separated values "
              "through Hydra's launcher; [cyan]hydra.run.dir=PATH[/] places the run folder."]
    if job.examples:
        lines += ["", "[bold]Examples[/]:"] + [f"  {e}" for e in job.examples]
    return "\n".join(lines)


# Actions that work on files rather than composing a Hydra config: "command action" ->
# "module:function(argv) -> exit status" (the function parses its own options).
FILE_ACTIONS = {
    "tokenize-image encode": "tokctl.imagetok.codec:encode_main",
    "tokenize-image decode": "tokctl.imagetok.codec:decode_main",
}


def _run_file_action(target: str, args: list[str]) -> None:
    import importlib

    module, _, name = target.partition(":")
    raise typer.Exit(getattr(importlib.import_module(module), name)(args))


def _run_job_command(top: str, args: list[str]) -> None:
    if args and f"{top} {args[0]}" in FILE_ACTIONS:
        _run_file_action(FILE_ACTIONS[f"{top} {args[0]}"], args[1:])
    jobs = _jobs_of(top)
    action = ""
    if len(args) > 1 and f"{args[0]} {args[1]}" in jobs:  # a two-word action: "prior train"
        action, args = f"{args[0]} {args[1]}", args[2:]
    elif args and args[0] in jobs and args[0] != "":
        action, args = args[0], args[1:]
    if action not in jobs:
        _fail(f"`tokctl {top}` needs an action: {', '.join(a for a in jobs if a)}")
    job = jobs[action]
    if any(a in ("-h", "--help") for a in args):
        text = describe(job)
        others = [a for a in jobs if a and a != action]
        others += [a.split(" ", 1)[1] for a in FILE_ACTIONS if a.startswith(top + " ")]
        if others and not action:
            text += "\n\n[bold]Actions[/]: " + ", ".join(f"tokctl {top} {a}" for a in others)
        console.print(text, soft_wrap=True)
        return
    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    from tokctl.jobs import JobCrashed, run_multirun, run_single

    try:
        if multirun:
            path, complete = run_multirun(job, overrides)
            console.print(str(path), soft_wrap=True)
            if not complete:  # some point failed: say so in the exit status, for scripts
                raise typer.Exit(1)
            return
        status, path = run_single(job, overrides)
    except UserError as exc:
        _fail(str(exc))
    except JobCrashed as exc:
        where = exc.path / "error.txt"
        err_console.print(f"[bold red]error:[/] {exc}"
                          + (f" (traceback in {where})" if where.exists() else ""), soft_wrap=True)
        console.print(str(exc.path), soft_wrap=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]: finished samples are kept")
        raise typer.Exit(130)
    console.print(str(path), soft_wrap=True)


def _job_command(top: str, summary: str) -> None:
    @app.command(top, help=summary + " Run `tokctl " + top + " --help` for its config groups.",
                 context_settings=JOB_CONTEXT, add_help_option=False)
    def command(ctx: typer.Context) -> None:
        _run_job_command(top, list(ctx.args))


for _top in dict.fromkeys(name.split(" ")[0] for name in JOBS):
    _job_command(_top, _jobs_of(_top).get("", next(iter(_jobs_of(_top).values()))).summary)


# ------------------------------------------------------------------------------------------ runs
runs_app = typer.Typer(help="List, show and compare run folders (reads only the files in them).",
                       no_args_is_help=True)
app.add_typer(runs_app, name="runs")


@runs_app.command("ls")
def runs_ls(root: Path = typer.Argument(Path("runs"), help="Folder to search for runs."),
            command: Optional[str] = typer.Option(None, "--command", "-c",
                                                  help="Only runs of this command."),
            limit: int = typer.Option(30, "--limit", "-n", help="Newest N runs."),
            as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List runs, newest first."""
    from tokctl import report

    try:
        report.runs_ls(root, command=command, limit=limit, as_json=as_json)
    except UserError as exc:
        _fail(str(exc))


@runs_app.command("show")
def runs_show(run: Path = typer.Argument(..., help="A run folder."),
              as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Config, environment, status and metrics of one run."""
    from tokctl import report

    try:
        report.runs_show(run, as_json=as_json)
    except UserError as exc:
        _fail(str(exc))


@runs_app.command("compare")
def runs_compare(runs: List[Path] = typer.Argument(..., help="Run folders, sweep folders, or "
                                                             "folders of runs."),
                 metric: Optional[List[str]] = typer.Option(
                     None, "--metric", "-k", help="Metric(s) to show; the first ranks the runs. "
                                                  "Nested ones with dots: per_category.code.speedup."),
                 ascending: Optional[bool] = typer.Option(
                     None, "--ascending/--descending",
                     help="Rank lowest/highest first (default: by metric, e.g. gflops lowest)."),
                 as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Runs of one command ranked in a table: the config keys that differ, and their metrics."""
    from tokctl import report

    try:
        report.runs_compare(runs, metrics=metric, as_json=as_json, ascending=ascending)
    except UserError as exc:
        _fail(str(exc))


@app.command("report")
def report_command(paths: List[Path] = typer.Argument(..., help="Sweep folders, run folders, "
                                                                "or folders of runs."),
                   out: Path = typer.Option(Path("report"), "--out", "-o",
                                            help="Folder for the PNGs and report.md."),
                   as_json: bool = typer.Option(False, "--json",
                                                help="Print what was written as JSON.")) -> None:
    """Plots and a markdown summary of runs: speedup per category per method (decode), accuracy
    against throughput and FLOPs (compress-vit), rate-distortion (tokenize-image)."""
    from tokctl import report

    try:
        report.write_report(paths, out, as_json=as_json)
    except UserError as exc:
        _fail(str(exc))


def main() -> None:
    try:
        app()
    except UserError as exc:  # raised outside a command (e.g. configs missing)
        err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback on request
        if os.environ.get("TOKCTL_DEBUG"):
            raise
        err_console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc} "
                          f"(set TOKCTL_DEBUG=1 for the traceback)", soft_wrap=True, markup=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
