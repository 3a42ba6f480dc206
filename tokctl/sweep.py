"""Sweeps: ``tokctl <command> -m key=a,b``, run by ``hydra.main`` in multirun mode (Hydra's basic
sweeper, the chosen launcher) with :class:`PointTask` as the task. Every point composes before
anything is made. A point's folder number is its place in sweep.json, so that a resumed or grown
grid keeps it. ``+resume=true`` launches the grid again, and the task of a point that completed,
or still runs elsewhere, returns at once.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import signal
import socket
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from omegaconf import OmegaConf

from tokctl.config import common_searchpath, compose, compose_with_hydra, conf_dir, sweep_points
from tokctl.console import err_console
from tokctl.errors import UserError, one_line
from tokctl.jobs import Job, JobCrashed, execute, load_target
from tokctl.runs import (atomic_write_json, check_writable, interrupts_as_exceptions, new_run_dir,
                         read_json, read_status)

SWEEP_JSON, ATTEMPTS = "sweep.json", ".attempts"
STOP = ".stop"  # made when a sweep is interrupted: its points that have not started never start


def parse_request(overrides: list[str]) -> SimpleNamespace:
    """What was typed: task overrides (sweep syntax included), Hydra's own, the sweep folder and
    ``resume`` (None; "true": the newest sweep of the same overrides; or a sweep folder)."""
    req = SimpleNamespace(task=[], hydra=[], sweep_dir=None, resume=None)
    for o in overrides:
        key, eq, value = o.partition("=")
        if eq and key.lstrip("+") == "resume":
            v = value.strip().lower()
            req.resume = None if v in ("false", "no", "0", "off", "null", "none", "") else \
                "true" if v in ("true", "yes", "1", "on") else value
        elif key in ("hydra.run.dir", "hydra.sweep.subdir"):
            raise UserError(f"{key}: a sweep's folder is set with hydra.sweep.dir=PATH, and "
                            f"tokctl names the point folders itself (0, 1, ...; see sweep.json)")
        elif key == "hydra.sweep.dir":
            req.sweep_dir = value
        else:
            (req.hydra if o.lstrip("+").startswith(("hydra.", "hydra/")) else req.task).append(o)
    req.spec = sorted(req.task)  # what finds the sweep again, in any order
    return req


def number_points(plan: list[list[str]], grid: list[list[str]]) -> list[int]:
    """Each grid point's folder number: its place in the plan, new points appended to it."""
    keys = [sorted(p) for p in plan]
    for point in grid:
        if sorted(point) not in keys:
            plan.append(point)
            keys.append(sorted(point))
    return [keys.index(sorted(point)) for point in grid]


def point_folder(*, _root_) -> str:
    """``hydra.sweep.subdir``, which Hydra resolves wherever the point runs."""
    plan = [p["overrides"] for p in read_json(Path(_root_.hydra.sweep.dir) / SWEEP_JSON)["points"]]
    return str(number_points(plan, [list(_root_.hydra.overrides.task)])[0])


OmegaConf.register_new_resolver("tokctl_point", point_folder, replace=True)


class PointTask:
    """One point, here or in a submitit job (module level, so that submitit pickles it by name)."""

    def __init__(self, job: Job, sweep_dir: Path, to_run: list[int], threads: int | None):
        self.job, self.sweep_dir, self.to_run, self.threads = job, sweep_dir, set(to_run), threads
        self.argv, self.parent_pid = list(sys.argv), os.getpid()

    def __call__(self, cfg) -> str:
        from hydra.core.hydra_config import HydraConfig

        sys.argv = self.argv  # hydra.main took its arguments from there: record the user's
        out = Path(HydraConfig.get().runtime.output_dir)
        here = os.getpid() == self.parent_pid
        extra = () if here else preemption_signal()
        try:
            with interrupts_as_exceptions(extra):
                status = read_status(out)
                if int(out.name) not in self.to_run or status == "completed":
                    return status or "not run"  # resumed: completed, or running elsewhere
                if (self.sweep_dir / STOP).exists():
                    return discard_unstarted(out)
                if status is not None:  # an earlier attempt (a scheduler's requeue, say)
                    set_aside(self.sweep_dir, out)
                if self.threads and str(cfg.get("threads", "")) in ("auto", "0", "None"):
                    cfg.threads = self.threads  # parallel jobs share this machine's CPUs
                OmegaConf.resolve(cfg)
                return execute(self.job, cfg, out, extra_signals=extra)[0]
        except KeyboardInterrupt:
            if here:
                raise  # the basic launcher: the sweep stops here
            return read_status(out) or discard_unstarted(out)
        except UserError as exc:
            print(f"error: {exc} ({out})", file=sys.stderr)
        except JobCrashed as exc:
            print(f"error: {exc} (traceback in {out / 'error.txt'})", file=sys.stderr)
        return "failed"


def preemption_signal() -> tuple[int, ...]:
    """In a submitit job, the time-limit or pre-emption warning stops the run as SIGTERM does."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return ()
    import submitit

    return (getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG),)


def discard_unstarted(out: Path) -> str:
    if out.is_dir() and all(p.name == ".hydra" for p in out.iterdir()):
        shutil.rmtree(out, ignore_errors=True)  # only what Hydra wrote: nothing ran there
    return "not started"


def set_aside(sweep_dir: Path, folder: Path) -> None:
    """An earlier attempt (all but this attempt's .hydra/) to .attempts/<num>-<k>."""
    dest = sweep_dir / ATTEMPTS / f"{folder.name}-{1 + len(attempts(sweep_dir, folder.name))}"
    dest.mkdir(parents=True)
    for item in folder.iterdir():
        if item.name != ".hydra":
            os.replace(item, dest / item.name)


def attempts(sweep_dir: Path, name: str) -> list[str]:
    found = sorted((sweep_dir / ATTEMPTS).glob(f"{name}-*"), key=lambda p: int(p.name.split("-")[1]))
    return [f"{ATTEMPTS}/{p.name}" for p in found]


def still_running(run: Path) -> bool:
    """Whether a point that says ``running`` runs (its process on this host, or its SLURM job as
    submitit's job object sees it), rather than having been killed too hard to say so."""
    env = read_json(run / "env.json") or {}
    slurm = env.get("env") or {}
    if env.get("pid") and env.get("host") == socket.gethostname():
        try:
            os.kill(int(env["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    if "SLURM_JOB_ID" not in slurm or not shutil.which("sacct"):
        return False
    import submitit

    task = slurm.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{slurm['SLURM_ARRAY_JOB_ID']}_{task}" if task else slurm["SLURM_JOB_ID"]
    return not submitit.SlurmJob(run.parent / ".submitit" / "%j", job_id).done(force_check=True)


def run_sweep(job: Job, overrides: list[str]) -> SimpleNamespace:
    """The sweep's path, its state (finished | interrupted) and whether every point of the grid
    completed."""
    req = parse_request(overrides)
    grid = sweep_points(req.task)
    load_target(job)
    launcher, kind = launcher_of(job, req.hydra)
    if kind == "slurm" and not shutil.which("sbatch"):
        raise UserError("this launcher submits SLURM jobs with sbatch, which is not on PATH: run "
                        "the sweep on the cluster's login node, or use "
                        "hydra/launcher=submitit_local on this machine")
    for point in grid:  # every point composes before anything is made
        try:
            cfg = compose(job.conf, job.config_name, [*point, *req.hydra])
        except UserError as exc:
            raise UserError(f"sweep point {' '.join(point)}: {exc}") from None
    sweep_dir = sweep_folder(req, job, Path(str(cfg.get("runs_dir") or "runs"))).resolve()

    with sweep_lock(sweep_dir):
        summary = read_json(sweep_dir / SWEEP_JSON)
        if summary is not None and req.resume is None:
            raise UserError(f"{sweep_dir} already holds a sweep; add +resume=true to rerun its "
                            f"unfinished points, or choose another hydra.sweep.dir=PATH")
        summary = summary or {"created": _now()}
        plan = [p["overrides"] for p in summary.get("points", [])]
        nums = number_points(plan, grid)
        (sweep_dir / STOP).unlink(missing_ok=True)
        status = {n: read_status(sweep_dir / str(n)) for n in nums}
        skipped = [n for n in nums if status[n] == "completed"]
        busy = [n for n in nums if status[n] == "running" and still_running(sweep_dir / str(n))]
        to_run = [n for n in nums if n not in skipped + busy]
        threads = None
        if kind == "local" and len(to_run) > 1 and not any(
                o.partition("=")[0].lstrip("+") == "threads" for o in req.task):
            threads = max(1, len(os.sched_getaffinity(0)) // len(to_run))
        now = {"started": _now(), "argv": sys.argv, "host": socket.gethostname(),
               "launched": to_run, "skipped": skipped, "still_running": busy}
        summary.update(command=job.command, spec=req.spec, launcher=launcher, state="running",
                       invocations=[*summary.get("invocations", []), now])
        write_sweep_json(sweep_dir, summary, plan, nums)
        err_console.print(f"[bold]sweep[/] {sweep_dir}: {len(to_run)} to run with launcher "
                          f"{launcher}, {len(skipped)} completed earlier, {len(busy)} still "
                          f"running elsewhere" + (f"; threads={threads} per job" if threads else ""),
                          soft_wrap=True)
        args = [*req.task, *req.hydra, common_searchpath(), f"hydra.sweep.dir={sweep_dir}",
                "hydra.sweep.subdir=${tokctl_point:}", f"hydra.job.name=tokctl-{job.run_folder_name}"]
        args += [f"{g}=none" for g in ("hydra/job_logging", "hydra/hydra_logging")
                 if not any(o.startswith(g) for o in req.hydra)]  # Hydra's logs: off unless asked
        stop: list[int] = []
        start = time.perf_counter()
        try:
            if to_run:
                with sweep_signals(kind, sweep_dir, stop):
                    hydra_multirun(job, PointTask(job, sweep_dir, to_run, threads), args)
        except KeyboardInterrupt:
            stop.append(signal.SIGINT)
            (sweep_dir / STOP).touch()  # array tasks that start later return at once
        except Exception as exc:  # noqa: BLE001 - a launcher's failure: one line, statuses kept
            now["launcher_error"] = one_line(f"{type(exc).__name__}: {exc}")
            err_console.print(f"[bold red]error:[/] the launcher failed: {now['launcher_error']}",
                              soft_wrap=True)
        finally:
            now.update(finished=_now(), wall_s=round(time.perf_counter() - start, 3))
            summary["state"] = "interrupted" if stop else "finished"
            rows = write_sweep_json(sweep_dir, summary, plan, nums)
    return SimpleNamespace(path=sweep_dir, state=summary["state"],
                           complete=all(r["status"] == "completed" for r in rows if r["in_grid"]))


def launcher_of(job: Job, hydra_overrides: list[str]) -> tuple[str, str]:
    """The launcher's name, and its kind: basic (here), local (submitit processes), slurm, other."""
    try:
        hydra = compose_with_hydra(job.conf, job.config_name, hydra_overrides).hydra
    except UserError as exc:
        import importlib.util

        if "hydra/launcher" in str(exc) and not importlib.util.find_spec(
                "hydra_plugins.hydra_submitit_launcher"):
            raise UserError(f"{exc} (the submitit launchers need: pip install 'tokctl[slurm]')")
        raise
    target = str(hydra.launcher.get("_target_", ""))
    kind = "basic" if target.endswith("BasicLauncher") else "other" if "submitit" not in target \
        else "slurm" if target.endswith("SlurmLauncher") else "local"
    return str(hydra.runtime.choices.get("hydra/launcher") or kind), kind


def hydra_multirun(job: Job, task: PointTask, args: list[str]) -> None:
    """``@hydra.main`` in multirun mode, with ``args`` as its command line."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    main = hydra.main(config_path=str(conf_dir(job.conf)), config_name=job.config_name,
                      version_base="1.3")(task)
    argv, full_error = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [argv[0], "--multirun", *args]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # a launcher's error reaches tokctl, rather than exit(1)
    try:
        main()
    finally:
        sys.argv = argv
        if full_error is None:
            del os.environ["HYDRA_FULL_ERROR"]
        GlobalHydra.instance().clear()


@contextmanager
def sweep_signals(kind: str, sweep_dir: Path, stop: list[int]):
    """SIGINT/SIGTERM while the launcher runs. basic: they interrupt the point running here, and
    the sweep; slurm, other: tokctl stops waiting, running jobs finish. local: Ctrl-C reaches
    every job (one process group), each saves what it finished, and tokctl waits for them.
    SIGINT stays blocked here meanwhile, and the jobs inherit the block until their handler is
    up, so that submitit's job controllers never see it (they would SIGKILL their job a second
    later); a SIGTERM to tokctl alone is passed on to the running points."""
    if kind != "local":
        with interrupts_as_exceptions():
            yield
        return

    def forward(signum, frame):  # noqa: ARG001
        stop.append(signum)
        (sweep_dir / STOP).touch()
        for env in sweep_dir.glob("[0-9]*/env.json"):
            if read_status(env.parent) == "running":
                try:
                    os.kill(int(read_json(env)["pid"]), signal.SIGTERM)
                except (OSError, KeyError, TypeError):
                    pass

    def record(signum, frame):  # noqa: ARG001
        stop.append(signum)
        (sweep_dir / STOP).touch()

    old = signal.signal(signal.SIGTERM, forward)
    # The block covers this thread only: a SIGINT the kernel hands to another thread of this
    # process (one a library started earlier) still runs Python's handler here, which by default
    # raises KeyboardInterrupt wherever the launcher's code is (submitit's wait loop may swallow
    # it: the sweep then ended "finished" with interrupted points). Recording it instead keeps
    # the outcome the same whichever thread takes the signal.
    old_int = signal.signal(signal.SIGINT, record)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        if signal.SIGINT in signal.sigpending():
            stop.append(signal.sigwait({signal.SIGINT}))
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old)


@contextmanager
def sweep_lock(sweep_dir: Path):
    """One tokctl process per sweep folder at a time."""
    import fcntl

    with open(sweep_dir / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"another tokctl process is running the sweep in {sweep_dir}; wait "
                            f"for it or choose another hydra.sweep.dir=PATH") from None
        yield


def sweep_folder(req: SimpleNamespace, job: Job, root: Path) -> Path:
    base = root / job.run_folder_name
    if req.resume == "true" and not req.sweep_dir:
        found = [(str(d.get("created")), f.stat().st_mtime, f.parent)
                 for f in base.glob(f"*/*/{SWEEP_JSON}")
                 if sorted((d := read_json(f) or {}).get("spec", [])) == req.spec]
        if not found:
            raise UserError(f"no earlier sweep with these overrides under {base} to resume; give "
                            f"its folder with +resume=PATH")
        req.resume = str(max(found)[2])
    elif req.resume not in (None, "true"):
        if req.sweep_dir and Path(req.sweep_dir).resolve() != Path(req.resume).resolve():
            raise UserError(f"+resume={req.resume} and hydra.sweep.dir={req.sweep_dir} name "
                            f"different sweeps; give one of them")
        if not (Path(req.resume) / SWEEP_JSON).is_file():
            raise UserError(f"+resume={req.resume}: no sweep there (no {SWEEP_JSON}); give the "
                            f"folder `tokctl {job.command} -m` printed")
    path = Path(req.sweep_dir or req.resume or root)
    check_writable(path)
    if not (req.sweep_dir or req.resume):
        return new_run_dir(root, job.run_folder_name, "sweep")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_sweep_json(sweep_dir: Path, summary: dict, plan: list[list[str]],
                     nums: list[int]) -> list[dict]:
    rows = []
    for num, overrides in enumerate(plan):
        metrics = read_json(sweep_dir / str(num) / "metrics.json") or {}
        rows.append({"num": num, "dir": str(num), "overrides": overrides,
                     "status": read_status(sweep_dir / str(num)) or "pending",
                     "in_grid": num in nums, "attempts": attempts(sweep_dir, str(num)),
                     "metrics": {k: v for k, v in metrics.items()
                                 if isinstance(v, (int, float, str, bool, type(None)))}})
    summary.update(updated=_now(), points=rows, counts=dict(Counter(r["status"] for r in rows)))
    atomic_write_json(sweep_dir / SWEEP_JSON, summary)
    return rows


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")
