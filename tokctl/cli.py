"""The `tokctl` command line: one thin command per job; the work happens in tokctl.jobs."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from tokctl.console import console, err_console
from tokctl.errors import UserError
from tokctl.jobs import COMMAND_GROUPS, JOBS, Job, JobCrashed, run_single
from tokctl.sweep import run_sweep

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
    """--help for a job: its groups and options, and every key with its default and type, all
    read from conf/ (so a key or option added to a YAML shows up here with no other edit)."""
    from rich.markup import escape

    from tokctl.config import schema_for

    sch = schema_for(job.conf, job.config_name)
    lines = [f"[bold]tokctl {job.command}[/] [dim][OVERRIDES...] [-m][/]", "", job.summary, ""]
    if sch.choices:
        lines.append("[bold]Config groups[/] (choose with group=option; default in bold):")
        for group, chosen in sch.choices.items():
            shown = ", ".join(f"[bold green]{o}[/]" if o == chosen else o
                              for o in sch.groups[group])
            lines.append(f"  [cyan]{group}[/]: {shown}")
        lines.append("")
    in_group = tuple(g.replace("/", ".") + "." for g in sch.choices)
    own = [k for k in sch.keys() if not k.startswith(in_group) and k not in sch.choices
           and not isinstance(sch.get(k).default, dict)]
    lines.append("[bold]Keys[/] (key=default, then what it takes where the default cannot say):")
    width = max((len(_key_default(k, sch)) for k in own), default=0)
    for k in own:
        shown = _key_default(k, sch)
        kind = _kind(sch.get(k))
        lines.append(f"  [cyan]{escape(shown)}[/]" + (" " * (width - len(shown) + 2)
                                                     + f"[dim]{escape(kind)}[/]" if kind else ""))
    examples = []
    for group, chosen in sorted(sch.choices.items(), key=lambda gc: gc[0] != "method"):
        prefix = group.replace("/", ".") + "."
        keys = [k for k in sch.keys() if k.startswith(prefix) and k[len(prefix):] not in
                ("_target_", "name") and not isinstance(sch.get(k).default, dict)]
        if keys:
            examples += [k for k in keys if sch.get(k).default is not None]
            lines.append(f"  [cyan]{group}[/] keys of {group}={chosen}: "
                         + escape(", ".join(_key_default(k, sch)[len(prefix):] for k in keys)))
    scalar = [k for k in own if sch.get(k).default is not None
              and not isinstance(sch.get(k).default, (list, dict))]
    examples += [k for k in scalar if "." in k] + scalar
    example = _key_default(examples[0], sch) if examples else None
    lines += ["", "Set any key above with [cyan]key=value[/]"
              + (f" (e.g. {escape(example)})" if example else "")
              + "; a misspelt key, a key no code reads (also with [cyan]+key=value[/]) or a "
                "value of the wrong type is refused ([cyan]++key=value[/] adds an undeclared "
                "key on purpose). [cyan]-m[/] sweeps comma-separated values "
                "through Hydra's launcher; [cyan]hydra.run.dir=PATH[/] places the run folder; "
                "[cyan]--cfg[/] prints the composed config and runs nothing."]
    if job.examples:
        lines += ["", "[bold]Examples[/]:"] + [f"  {escape(e)}" for e in job.examples]
    return "\n".join(lines)


def _key_default(key: str, sch) -> str:
    from tokctl.config import show_value

    return f"{key}={show_value(sch.get(key).default)}"


def _kind(spec) -> str:
    """The accepted forms, where the default alone does not say them (choices, ranges, null)."""
    if spec.alternatives is None:
        return ""
    if len(spec.alternatives) == 1 and not spec.alternatives[0].bounds:
        kind = spec.alternatives[0].type
        return "true | false" if kind == "bool" else ""
    return spec.short()


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
    default = action = COMMAND_GROUPS.get(top, ("",))[0]
    if len(args) > 1 and f"{args[0]} {args[1]}" in jobs:  # a two-word action: "prior train"
        action, args = f"{args[0]} {args[1]}", args[2:]
    elif args and args[0] in jobs and args[0] != "":
        action, args = args[0], args[1:]
    if action not in jobs:
        if any(a in ("-h", "--help") for a in args):  # a command with actions only (probe)
            console.print("\n".join(f"tokctl {top} {a}: {j.summary}" for a, j in jobs.items()),
                          soft_wrap=True)
            return
        _fail(f"`tokctl {top}` needs an action: {', '.join(a for a in jobs if a)}")
    _refuse_unknown_action(top, jobs, args, may_be_action=action == default)
    job = jobs[action]
    if any(a in ("-h", "--help") for a in args):
        text = describe(job)
        others = [a for a in jobs if a and a != action]
        others += [a.split(" ", 1)[1] for a in FILE_ACTIONS if a.startswith(top + " ")]
        if others and action == COMMAND_GROUPS.get(top, ("",))[0]:
            text += "\n\n[bold]Actions[/]: " + ", ".join(f"tokctl {top} {a}" for a in others)
        console.print(text, soft_wrap=True)
        return
    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if a not in ("-m", "--multirun", "--cfg")]
    if "--cfg" in args:  # compose and check only: print what would run, run nothing
        _print_config(job, overrides, multirun)
        return
    try:
        if multirun:
            from tokctl.config import check_sweep

            check_sweep(job.conf, job.config_name, overrides)
            _sweep(job, overrides)
            return
        status, path = run_single(job, overrides)
    except UserError as exc:
        kept = _kept_run_folder(exc)
        _fail(str(exc) + (f" (run folder: {kept})" if kept else ""))
    except JobCrashed as exc:
        where = exc.path / "error.txt"
        err_console.print(f"[bold red]error:[/] {exc}"
                          + (f" (traceback in {where})" if where.exists() else ""), soft_wrap=True)
        console.print(str(exc.path), soft_wrap=True)
        raise typer.Exit(1)
    except KeyboardInterrupt as exc:
        kept = _kept_run_folder(exc)
        if kept:
            err_console.print(f"[yellow]interrupted[/]: finished samples are kept in {kept}",
                              soft_wrap=True)
            console.print(str(kept), soft_wrap=True)
        else:
            err_console.print("[yellow]interrupted[/] before a run folder was made")
        raise typer.Exit(130)
    console.print(str(path), soft_wrap=True)


def _sweep(job: Job, overrides: list[str]) -> None:
    """A sweep, then its points side by side; exit 1 if a point did not complete, 130 if the
    sweep was interrupted."""
    from tokctl import report

    result = run_sweep(job, overrides)
    try:
        report.runs_compare([result.path])
    except UserError:  # no point started
        pass
    console.print(str(result.path), soft_wrap=True)
    if result.state == "interrupted":
        err_console.print("[yellow]interrupted[/]: finished samples are kept; "
                          "+resume=true runs the rest")
        raise typer.Exit(130)
    if not result.complete:
        raise typer.Exit(1)


def _print_config(job: Job, overrides: list[str], multirun: bool) -> None:
    from tokctl.config import check_sweep, compose, split_run_dir, sweep_points, to_yaml

    try:
        if multirun:
            check_sweep(job.conf, job.config_name, overrides)
            points = sweep_points([o for o in overrides if not o.startswith(("hydra", "+hydra"))
                                   and o.split("=", 1)[0].lstrip("+") != "resume"])
            for point in points:
                console.print(" ".join(point) or "(defaults)", soft_wrap=True)
            return
        _, rest = split_run_dir(overrides)
        console.print(to_yaml(compose(job.conf, job.config_name, rest)), soft_wrap=True, end="")
    except UserError as exc:
        _fail(str(exc))


def _kept_run_folder(exc: BaseException) -> Path | None:
    """The run folder a failed or interrupted job left (tokctl.jobs.execute names it)."""
    path = getattr(exc, "run_dir", None)
    return path if path is not None and Path(path).is_dir() else None


def _refuse_unknown_action(top: str, jobs: dict[str, Job], args: list[str],
                           may_be_action: bool) -> None:
    """``tokctl tokenize-image evl``: a word that is neither an action nor an override."""
    if not args or "=" in args[0] or args[0].startswith(("-", "+", "~")):
        return
    from tokctl.config import did_you_mean

    actions = [a for a in jobs if a] + [a.split(" ", 1)[1] for a in FILE_ACTIONS
                                         if a.startswith(top + " ")]
    hint = did_you_mean(args[0], actions) if actions and may_be_action else ""
    if hint:
        _fail(f"no action {args[0]!r} in `tokctl {top}`; {hint}(actions: {', '.join(actions)})")
    listing = f", or one of its actions ({', '.join(actions)})" if actions else ""
    _fail(f"{args[0]!r} is not an override: `tokctl {top}` takes key=value overrides{listing} "
          f"(see tokctl {top} --help)")


def _job_command(top: str, summary: str) -> None:
    @app.command(top, help=summary + " Run `tokctl " + top + " --help` for its config groups.",
                 context_settings=JOB_CONTEXT, add_help_option=False)
    def command(ctx: typer.Context) -> None:
        _run_job_command(top, list(ctx.args))


for _top in dict.fromkeys(name.split(" ")[0] for name in JOBS):
    _job_command(_top, COMMAND_GROUPS[_top][1] if _top in COMMAND_GROUPS
                 else _jobs_of(_top)[""].summary)


# ------------------------------------------------------------------------------------------ runs
runs_app = typer.Typer(help="List, show and compare run folders (reads only the files in them).",
                       no_args_is_help=True)
app.add_typer(runs_app, name="runs")


@runs_app.command("ls")
def runs_ls(root: Path = typer.Argument(Path("runs"), help="Folder to search for runs."),
            command: Optional[str] = typer.Option(None, "--command", "-c",
                                                  help="Only runs of this command."),
            limit: int = typer.Option(30, "--limit", "-n", help="Newest N runs."),
            show_all: bool = typer.Option(False, "--all", "-a", help="Include failed runs."),
            as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
            as_csv: bool = typer.Option(False, "--csv", help="CSV, one row per run.")) -> None:
    """List runs, newest first, grouped by their folder, with each command's headline metrics.
    Failed runs are hidden unless --all."""
    from tokctl import report

    try:
        report.runs_ls(root, command=command, limit=limit, as_json=as_json, show_all=show_all,
                       as_csv=as_csv)
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
                 show_all: bool = typer.Option(False, "--all", "-a",
                                               help="Include failed runs (ranked apart)."),
                 as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
                 as_csv: bool = typer.Option(False, "--csv", help="CSV: every differing setting "
                                                                  "and scalar metric.")) -> None:
    """Runs of one command ranked by their headline metrics (the first ranks), each named by the
    settings that set it apart. Incomplete runs are ranked apart; failed ones hidden unless --all."""
    from tokctl import report

    try:
        report.runs_compare(runs, metrics=metric, as_json=as_json, ascending=ascending,
                            show_all=show_all, as_csv=as_csv)
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
