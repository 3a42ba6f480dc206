"""Sweeps: ``tokctl <command> -m key=a,b other=x,y``, run by Hydra's own multirun.

tokctl composes every point first (a typo fails in one line, before any folder), then hands the
overrides to ``hydra.main`` in multirun mode: Hydra's basic sweeper expands the grid and the
configured launcher runs it (``basic``: one after another in this process; ``submitit_local``:
parallel processes; ``submitit_slurm``: a SLURM job array). One folder holds the whole sweep::

    <sweep>/            runs/<command>/<date>/<time>_sweep, or hydra.sweep.dir=PATH
      sweep.json        every point's overrides, folder, status, attempts and scalar metrics;
                        the launcher; each invocation's wall time
      multirun.yaml     the sweep's config, saved by Hydra's sweeper
      0/ 1/ ...         one run folder per point, numbered once and for good
      .attempts/3-1/    earlier attempts of points a resume ran again (kept, never deleted)

``+resume=true`` reruns the newest earlier sweep of the same overrides (``+resume=PATH``: that
folder; ``hydra.sweep.dir=PATH +resume=true``: that folder, started fresh if it holds no sweep).
The whole grid is launched again and each point's task returns at once if the point completed
(or still runs elsewhere); the others run again, their earlier attempt moved to ``.attempts/``.
Points added to the grid get new folders; sweep.json maps overrides to folders, and the sweep's
``hydra.sweep.subdir`` looks each point's folder up there.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import signal
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from omegaconf import OmegaConf

from tokctl.config import common_searchpath, compose, conf_dir, sweep_points
from tokctl.console import err_console
from tokctl.errors import UserError, one_line
from tokctl.jobs import Job, JobCrashed, execute, load_target
from tokctl.runs import (atomic_write_json, check_writable, interrupts_as_exceptions, new_run_dir,
                         read_json, read_status)

SWEEP_JSON, ATTEMPTS, LOCK = "sweep.json", ".attempts", ".lock"
STOP = ".stop"  # made when a sweep is interrupted: its jobs that have not started yet never start
TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off", "null", "none", "")


# --------------------------------------------------------------------------- request and plan
@dataclass
class Request:
    """A sweep as typed: the task overrides (with sweep syntax), Hydra's own, and resume."""

    task: list[str]
    hydra: list[str]
    sweep_dir: str | None = None
    resume: str | None = None  # None, "true" (the newest matching sweep) or a sweep folder

    @property
    def spec(self) -> list[str]:  # what finds the sweep again: its task overrides, in any order
        return sorted(self.task)


def parse_request(overrides: list[str]) -> Request:
    req = Request(task=[], hydra=[])
    for o in overrides:
        key, eq, value = o.partition("=")
        if o.startswith("-"):
            raise UserError(f"unknown option {o!r}; configs are changed with key=value overrides "
                            f"(see --help)")
        if eq and key.lstrip("+") == "resume":
            v = value.strip().lower()
            req.resume = None if v in FALSE else "true" if v in TRUE else value
        elif key == "hydra.run.dir":
            raise UserError("hydra.run.dir places a single run; a sweep's folder is set with "
                            "hydra.sweep.dir=PATH")
        elif key == "hydra.sweep.dir":
            req.sweep_dir = value
        elif key == "hydra.sweep.subdir":
            raise UserError("hydra.sweep.subdir: tokctl names the point folders itself (0, 1, ...; "
                            "sweep.json maps them to their overrides)")
        elif o.lstrip("+").startswith(("hydra.", "hydra/")):
            req.hydra.append(o)
        else:
            req.task.append(o)
    return req


@dataclass
class Point:
    num: int
    overrides: list[str]

    @property
    def dir(self) -> str:
        return str(self.num)

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(sorted(self.overrides))


@dataclass
class Plan:
    """Every point the sweep folder has ever held, each with its folder number for good."""

    points: list[Point] = field(default_factory=list)

    def add(self, overrides: list[str]) -> Point:
        key = tuple(sorted(overrides))
        found = next((p for p in self.points if p.key == key), None)
        if found is None:
            found = Point(1 + max((p.num for p in self.points), default=-1), list(overrides))
            self.points.append(found)
        return found

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "Plan":
        return cls([Point(int(p["num"]), list(p["overrides"])) for p in (data or {}).get("points", [])])


def point_folder(*, _root_) -> str:
    """``hydra.sweep.subdir`` of every tokctl sweep: the point's folder, looked up in sweep.json
    by its overrides. Resolved by Hydra wherever the job runs (this process or a submitit job)."""
    key = tuple(sorted(_root_.hydra.overrides.task))
    plan = Plan.from_json(read_json(Path(_root_.hydra.sweep.dir) / SWEEP_JSON))
    return next(p.dir for p in plan.points if p.key == key)


OmegaConf.register_new_resolver("tokctl_point", point_folder, replace=True)


# ------------------------------------------------------------------------------ one point's task
class PointTask:
    """Hydra's task function for one point, in this process or in a submitit job (a module-level
    class, so that submitit pickles it by reference)."""

    def __init__(self, job: Job, sweep_dir: Path, to_run: list[int], threads: int | None):
        self.job, self.sweep_dir, self.to_run, self.threads = job, sweep_dir, set(to_run), threads
        self.argv, self.parent_pid = list(sys.argv), os.getpid()

    def __call__(self, cfg) -> str:
        from hydra.core.hydra_config import HydraConfig

        sys.argv = self.argv  # hydra.main read its arguments there: the run records the user's
        out = Path(HydraConfig.get().runtime.output_dir)
        in_process = os.getpid() == self.parent_pid
        extra = () if in_process else preemption_signals()
        try:
            with interrupts_as_exceptions(extra):
                status = read_status(out)
                if int(out.name) not in self.to_run or status == "completed":
                    return status or "not run"  # a resume: completed earlier, or running elsewhere
                if (self.sweep_dir / STOP).exists():
                    return discard_unstarted(out)
                if status is not None:  # an earlier attempt (a scheduler's requeue, say)
                    set_aside(self.sweep_dir, out)
                if self.threads and str(cfg.get("threads", "")) in ("auto", "0", "None"):
                    cfg.threads = self.threads
                OmegaConf.resolve(cfg)
                return execute(self.job, cfg, out, extra_signals=extra)[0]
        except KeyboardInterrupt:
            if in_process:
                raise  # the basic launcher: the sweep stops here
            return read_status(out) or discard_unstarted(out)
        except UserError as exc:
            print(f"error: {exc} ({out})", file=sys.stderr)
        except JobCrashed as exc:
            print(f"error: {exc} (traceback in {out / 'error.txt'})", file=sys.stderr)
        return "failed"


def preemption_signals() -> tuple[int, ...]:
    """In a submitit job, the signal submitit warns of a time limit or pre-emption with (SIGUSR2
    unless SUBMITIT_PREEMPT_SIGNAL says otherwise): the run stops like on SIGTERM, keeps its
    samples, says ``interrupted``, and a resume reruns it."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return ()
    import submitit

    return (getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG),)


def discard_unstarted(out: Path) -> str:
    """A point folder holding only Hydra's .hydra/: the job never started, so neither did its run."""
    if out.is_dir() and all(p.name == ".hydra" for p in out.iterdir()):
        shutil.rmtree(out, ignore_errors=True)
    return "not started"


def set_aside(sweep_dir: Path, folder: Path) -> None:
    """Move an earlier attempt of a point (all but this attempt's .hydra/) to .attempts/<num>-<k>,
    so that nothing it wrote is lost and the rerun starts clean."""
    k = 1 + len(attempts(sweep_dir, folder.name))
    dest = sweep_dir / ATTEMPTS / f"{folder.name}-{k}"
    dest.mkdir(parents=True)
    for item in folder.iterdir():
        if item.name != ".hydra":
            os.replace(item, dest / item.name)


def attempts(sweep_dir: Path, name: str) -> list[str]:
    found = (sweep_dir / ATTEMPTS).glob(f"{name}-*")
    return [f"{ATTEMPTS}/{p.name}" for p in sorted(found, key=lambda p: int(p.name.split("-")[-1]))]


def still_running(run: Path) -> bool:
    """Whether a point that says ``running`` really runs (its process on this host, or its SLURM
    job as submitit sees it), rather than being a run killed too hard to say so."""
    env = read_json(run / "env.json") or {}
    if env.get("pid") and env.get("host") == socket.gethostname():
        try:
            os.kill(int(env["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    slurm = env.get("env") or {}
    if "SLURM_JOB_ID" in slurm and shutil.which("sacct"):
        import submitit

        job_id = (f"{slurm['SLURM_ARRAY_JOB_ID']}_{slurm['SLURM_ARRAY_TASK_ID']}"
                  if "SLURM_ARRAY_JOB_ID" in slurm else slurm["SLURM_JOB_ID"])
        return not submitit.SlurmJob(run.parent / ".submitit" / "%j", job_id).done(force_check=True)
    return False


# ---------------------------------------------------------------------------------- the sweep
@dataclass
class SweepResult:
    path: Path
    state: str  # finished | interrupted
    complete: bool  # every point of the grid completed


def run_sweep(job: Job, overrides: list[str]) -> SweepResult:
    req = parse_request(overrides)
    grid = sweep_points(req.task)
    load_target(job)
    hydra_cfg = launcher_config(job, req)
    kind = launcher_kind(hydra_cfg)
    if kind == "slurm" and not shutil.which("sbatch"):
        raise UserError("this launcher submits SLURM jobs with sbatch, which is not on PATH: run "
                        "the sweep on the cluster's login node, or use "
                        "hydra/launcher=submitit_local on this machine")
    configs = []
    for point in grid:  # every point composes before anything is made
        try:
            configs.append(compose(job.conf, job.config_name, [*point, *req.hydra]))
        except UserError as exc:
            raise UserError(f"sweep point {' '.join(point)}: {exc}") from None
    sweep_dir = sweep_folder(req, job, Path(str(configs[0].get("runs_dir") or "runs"))).resolve()

    with sweep_lock(sweep_dir):
        earlier = read_json(sweep_dir / SWEEP_JSON)
        if earlier is not None and req.resume is None:
            raise UserError(f"{sweep_dir} already holds a sweep; add +resume=true to rerun its "
                            f"unfinished points, or choose another hydra.sweep.dir=PATH")
        plan = Plan.from_json(earlier)
        points = [plan.add(point) for point in grid]
        (sweep_dir / STOP).unlink(missing_ok=True)
        status = {p.num: read_status(sweep_dir / p.dir) for p in points}
        skipped = [p.num for p in points if status[p.num] == "completed"]
        busy = [p.num for p in points
                if status[p.num] == "running" and still_running(sweep_dir / p.dir)]
        to_run = [p.num for p in points if p.num not in skipped + busy]
        untyped = not any(o.partition("=")[0].lstrip("+") == "threads" for o in req.task)
        threads = (max(1, len(os.sched_getaffinity(0)) // len(to_run))
                   if kind == "local" and len(to_run) > 1 and untyped else None)

        summary = {**(earlier or {}), "command": job.command, "spec": req.spec,
                   "launcher": str(hydra_cfg.runtime.choices.get("hydra/launcher") or kind),
                   "state": "running"}
        summary.setdefault("created", _now())
        invocation = {"started": _now(), "argv": sys.argv, "host": socket.gethostname(),
                      "launched": to_run, "skipped": skipped, "still_running": busy}
        summary["invocations"] = [*summary.get("invocations", []), invocation]
        write_sweep_json(sweep_dir, summary, plan, points)
        err_console.print(f"[bold]sweep[/] {sweep_dir}: {len(to_run)} to run with launcher "
                          f"{summary['launcher']}" + (f", {len(skipped)} completed earlier "
                          f"(skipped)" if skipped else "") + (f", {len(busy)} still running "
                          f"elsewhere (left alone)" if busy else "") + (f"; threads={threads} per "
                          f"parallel job" if threads else ""), soft_wrap=True)

        stop: list[int] = []
        start = time.perf_counter()
        try:
            if to_run:
                with sweep_signals(kind, sweep_dir, stop):
                    hydra_multirun(job, PointTask(job, sweep_dir, to_run, threads), [
                        *req.task, *req.hydra, *quiet_logging(req.hydra), common_searchpath(),
                        f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${tokctl_point:}",
                        f"hydra.job.name=tokctl-{job.run_folder_name}"])
        except KeyboardInterrupt:
            stop.append(signal.SIGINT)
        except Exception as exc:  # noqa: BLE001 - a launcher's failure: one line, statuses kept
            invocation["launcher_error"] = one_line(f"{type(exc).__name__}: {exc}")
            err_console.print(f"[bold red]error:[/] the launcher failed: "
                              f"{invocation['launcher_error']}", soft_wrap=True)
        finally:
            invocation.update(finished=_now(), wall_s=round(time.perf_counter() - start, 3))
            summary["state"] = "interrupted" if stop else "finished"
            rows = write_sweep_json(sweep_dir, summary, plan, points)
    in_grid = [r for r in rows if r["in_grid"]]
    return SweepResult(sweep_dir, summary["state"],
                       all(r["status"] == "completed" for r in in_grid))


def launcher_config(job: Job, req: Request):
    """Hydra's part of the sweep's config, composed with its hydra overrides: which launcher."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(conf_dir(job.conf)), version_base="1.3"):
            return hydra_compose(job.config_name, [*req.hydra, common_searchpath()],
                                 return_hydra_config=True).hydra
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        msg = one_line(str(exc)).split(" Config search path:")[0]
        if "hydra/launcher" in msg and not _has_submitit():
            msg += " (the submitit launchers need: pip install 'tokctl[slurm]')"
        raise UserError(msg.replace("Available options in", "; available options in")) from None


def _has_submitit() -> bool:
    import importlib.util

    return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None


def launcher_kind(hydra_cfg) -> str:
    """basic (in this process), local (submitit processes), slurm, or other."""
    target = str(hydra_cfg.launcher.get("_target_", ""))
    if target.endswith("BasicLauncher"):
        return "basic"
    return ("slurm" if target.endswith("SlurmLauncher") else "local") if "submitit" in target \
        else "other"


def quiet_logging(hydra_overrides: list[str]) -> list[str]:
    """Hydra's log files and console lines stay off unless asked for."""
    return [f"{g}=none" for g in ("hydra/job_logging", "hydra/hydra_logging")
            if not any(o.startswith(g + "=") for o in hydra_overrides)]


def hydra_multirun(job: Job, task: PointTask, args: list[str]) -> None:
    """``@hydra.main`` in multirun mode, with ``args`` as its command line."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    main = hydra.main(config_path=str(conf_dir(job.conf)), config_name=job.config_name,
                      version_base="1.3")(task)
    argv, full_error = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [argv[0], "--multirun", *args]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # a launcher's error reaches tokctl, not exit(1)
    try:
        main()
    finally:
        sys.argv = argv
        if full_error is None:
            del os.environ["HYDRA_FULL_ERROR"]
        GlobalHydra.instance().clear()


@contextmanager
def sweep_signals(kind: str, sweep_dir: Path, stop: list[int]) -> Iterator[None]:
    """SIGINT/SIGTERM while the launcher runs.

    basic: the points run here; a signal interrupts the current one and ends the sweep.
    local: Ctrl-C reaches every job (one process group) and each saves what it finished. SIGINT
    stays blocked here meanwhile, and the jobs inherit the block until their own handler is up,
    so submitit's job controllers never see it (they would SIGKILL their job a second later);
    this process takes its pending SIGINT once the jobs are done. A SIGTERM sent to this process
    alone is passed on to the running points. Jobs not started yet do not start.
    slurm and others: stop waiting; jobs not started yet do not start, running ones finish.
    """
    if kind == "basic":
        with interrupts_as_exceptions():
            yield
        return

    def on_signal(signum, frame):  # noqa: ARG001
        stop.append(signum)
        (sweep_dir / STOP).touch()
        if kind != "local":
            raise KeyboardInterrupt
        for env_json in sweep_dir.glob("[0-9]*/env.json"):
            pid = (read_json(env_json) or {}).get("pid")
            if pid and read_status(env_json.parent) == "running":
                try:
                    os.kill(int(pid), signal.SIGTERM)
                except OSError:
                    pass

    blocked = {signal.SIGINT} if kind == "local" else set()
    old = {s: signal.signal(s, on_signal) for s in {signal.SIGINT, signal.SIGTERM} - blocked}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        if signal.SIGINT in signal.sigpending() & blocked:
            stop.append(signal.sigwait(blocked))
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def sweep_lock(sweep_dir: Path) -> Iterator[None]:
    """One tokctl process per sweep folder at a time."""
    import fcntl

    with open(sweep_dir / LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"another tokctl process is running the sweep in {sweep_dir}; wait "
                            f"for it or choose another hydra.sweep.dir=PATH") from None
        yield


def sweep_folder(req: Request, job: Job, root: Path) -> Path:
    if req.resume not in (None, "true"):
        path = Path(req.resume)
        if req.sweep_dir and Path(req.sweep_dir).resolve() != path.resolve():
            raise UserError(f"+resume={req.resume} and hydra.sweep.dir={req.sweep_dir} name "
                            f"different sweeps; give one of them")
        if not (path / SWEEP_JSON).is_file():
            raise UserError(f"+resume={req.resume}: no sweep there (no {SWEEP_JSON}); give the "
                            f"folder `tokctl {job.command} -m` printed")
    elif req.sweep_dir:
        path = Path(req.sweep_dir)
        check_writable(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the sweep folder {path}: {exc.strerror or exc}") from None
    elif req.resume == "true":
        path = find_sweep(root / job.run_folder_name, req.spec)
        if path is None:
            raise UserError(f"no earlier sweep with these overrides under "
                            f"{root / job.run_folder_name} to resume; give its folder with "
                            f"+resume=PATH")
    else:
        check_writable(root)
        return new_run_dir(root, job.run_folder_name, "sweep")
    check_writable(path)
    return path


def find_sweep(base: Path, spec: list[str]) -> Path | None:
    """The newest sweep under ``base`` with these overrides."""
    found = [(str(d.get("created", "")), f.stat().st_mtime, f.parent)
             for f in base.glob(f"*/*/{SWEEP_JSON}")
             if sorted((d := read_json(f) or {}).get("spec", [])) == spec]
    return max(found)[2] if found else None


def write_sweep_json(sweep_dir: Path, summary: dict[str, Any], plan: Plan,
                     grid: list[Point]) -> list[dict[str, Any]]:
    in_grid = {p.num for p in grid}
    rows = []
    for p in sorted(plan.points, key=lambda p: p.num):
        metrics = read_json(sweep_dir / p.dir / "metrics.json") or {}
        rows.append({"num": p.num, "dir": p.dir, "overrides": p.overrides,
                     "status": read_status(sweep_dir / p.dir) or "pending",
                     "in_grid": p.num in in_grid, "attempts": attempts(sweep_dir, p.dir),
                     "metrics": {k: v for k, v in metrics.items()
                                 if isinstance(v, (int, float, str, bool)) or v is None}})
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary.update(updated=_now(), points=rows, counts=counts)
    atomic_write_json(sweep_dir / SWEEP_JSON, summary)
    return rows


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")
