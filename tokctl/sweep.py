"""Sweeps: ``tokctl <command> -m key=a,b other=x,y``, through Hydra's launchers.

tokctl expands the grid itself, composes every point before anything starts (a typo fails in one
line, before any job), and keeps one folder for the whole sweep::

    <sweep>/            runs/<command>/<date>/<time>_sweep, or hydra.sweep.dir=PATH
      sweep.json        the plan and its outcome: every point's overrides, folder, status and
                        headline metrics; the launcher; each invocation's wall time
      multirun.yaml     the composed config of the sweep, as Hydra's own sweeper saves it
      0/ 1/ ...         one run folder per point
      .attempts/3-1/    earlier attempts of points that a resume ran again (kept, never deleted)
      .submitit/        submitit's job files and logs (submitit launchers only)

The points that need running go to Hydra's configured launcher: ``basic`` runs them one after
another in this process, ``submitit_local`` as parallel processes, ``submitit_slurm`` as a SLURM
job array. Hydra's sweeper is bypassed on purpose: a resumed sweep launches an arbitrary subset
of the grid, which a cartesian sweeper cannot express.

``+resume=true`` reruns the newest earlier sweep of the same overrides (``+resume=PATH``: that
sweep folder; ``hydra.sweep.dir=PATH +resume=true``: that folder, started fresh if it holds no
sweep yet). Points already ``completed`` are skipped; failed, interrupted and never-started ones
run again, their earlier attempt moved to ``.attempts/``. Points added to the grid since are
appended; a point still running elsewhere is left alone.
"""

from __future__ import annotations

import copy
import datetime as _dt
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tokctl.console import console, err_console
from tokctl.errors import UserError, one_line

SWEEP_JSON = "sweep.json"
ATTEMPTS = ".attempts"
STOP = ".stop"  # present while an interrupted sweep winds down: jobs not yet started stay so
LOCK = ".lock"
TRUE = ("true", "yes", "1", "on")
FALSE = ("false", "no", "0", "off", "null", "none", "")


# --------------------------------------------------------------------------------- the request
@dataclass
class Request:
    """A sweep as typed: the task overrides (with sweep syntax), Hydra's own, and resume."""

    task: list[str]
    hydra: list[str]
    sweep_dir: str | None = None
    resume: str | None = None  # None, "true" (the newest matching sweep) or a sweep folder

    @property
    def spec(self) -> list[str]:
        """What identifies the sweep when resuming: its task overrides, in any order."""
        return sorted(self.task)


def parse_request(overrides: list[str]) -> Request:
    task, hydra_overrides, sweep_dir, resume = [], [], None, None
    for o in overrides:
        key, eq, value = o.partition("=")
        if eq and key.lstrip("+") == "resume":
            resume = None if value.strip().lower() in FALSE else (
                "true" if value.strip().lower() in TRUE else value)
        elif o.startswith("hydra.run.dir="):
            raise UserError("hydra.run.dir places a single run; a sweep's folder is set with "
                            "hydra.sweep.dir=PATH")
        elif o.startswith("hydra.sweep.dir="):
            sweep_dir = value
        elif o.startswith("hydra.sweep.subdir="):
            raise UserError("hydra.sweep.subdir: tokctl names the point folders itself (0, 1, ...; "
                            "sweep.json maps them to their overrides)")
        elif o.startswith(("hydra.", "hydra/", "+hydra.", "++hydra.")):
            hydra_overrides.append(o)
        else:
            task.append(o)
    return Request(task=task, hydra=hydra_overrides, sweep_dir=sweep_dir, resume=resume)


# ---------------------------------------------------------------------------------- the plan
@dataclass
class Point:
    num: int
    overrides: list[str]
    attempts: list[str] = field(default_factory=list)  # earlier attempts, relative to the sweep

    @property
    def dir(self) -> str:
        return str(self.num)

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(sorted(self.overrides))


@dataclass
class Plan:
    """Every point the sweep folder has ever held, with stable folder numbers."""

    points: list[Point] = field(default_factory=list)

    def add(self, overrides: list[str]) -> Point:
        key = tuple(sorted(overrides))
        for p in self.points:
            if p.key == key:
                return p
        point = Point(num=1 + max((p.num for p in self.points), default=-1), overrides=list(overrides))
        self.points.append(point)
        return point

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "Plan":
        plan = cls()
        for p in (data or {}).get("points", []):
            plan.points.append(Point(num=int(p["num"]), overrides=list(p["overrides"]),
                                     attempts=list(p.get("attempts", []))))
        return plan


# ------------------------------------------------------------------------------ the launcher
def launcher_kind(master) -> str:
    """basic (in this process), local (submitit processes), slurm, or other."""
    target = str(master.hydra.launcher.get("_target_", ""))
    if target.endswith("BasicLauncher"):
        return "basic"
    if "submitit" in target:
        return "slurm" if target.endswith("SlurmLauncher") else "local"
    return "other"


def _submitit_available() -> bool:
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        return False
    return True


def _launcher_error(req: Request, exc: Exception) -> UserError:
    msg = one_line(str(exc))
    choice = next((o.split("=", 1)[1] for o in req.hydra if o.startswith("hydra/launcher=")), "")
    if "hydra/launcher" in msg and not _submitit_available():
        return UserError(f"hydra/launcher={choice} needs the submitit launcher plugin: "
                         f"pip install 'tokctl[slurm]' (that is, hydra-submitit-launcher)")
    msg = msg.split(" Config search path:")[0]  # Hydra's list of folders: noise here
    return UserError(msg.replace("Available options in", "; available options in"))


# ------------------------------------------------------------------------------ the run task
class PointTask:
    """What the launcher runs for one point, in this process or in a submitit job.

    A module-level class rather than a closure, so that submitit pickles it by reference.
    """

    def __init__(self, job, sweep_dir: Path):
        self.job = job
        self.sweep_dir = str(Path(sweep_dir).resolve())  # hydra.job.chdir=true moves the cwd
        self.parent_pid = os.getpid()

    def __call__(self, cfg) -> str:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        from tokctl.jobs import JobCrashed, execute
        from tokctl.runs import interrupts_as_exceptions, read_status

        out = Path(HydraConfig.get().runtime.output_dir)
        in_process = os.getpid() == self.parent_pid
        extra = () if in_process else _scheduler_signals()
        try:
            with interrupts_as_exceptions(extra):
                if not in_process and (Path(self.sweep_dir) / STOP).exists():
                    _discard_unstarted(out)  # the sweep was interrupted before this job began
                    return "not started"
                if (out / "status").exists():  # a scheduler's requeue of this very point
                    if read_status(out) == "completed":
                        return "completed"
                    set_aside(Path(self.sweep_dir), out, keep_hydra=True)
                OmegaConf.resolve(cfg)
                status, _ = execute(self.job, cfg, out, extra_signals=extra)
        except KeyboardInterrupt:
            if in_process:
                raise  # the basic launcher: stop the whole sweep here
            return "interrupted"
        except UserError as exc:
            print(f"error: {exc} ({out})", file=sys.stderr)
            return "failed"
        except JobCrashed as exc:
            print(f"error: {exc} (traceback in {out / 'error.txt'})", file=sys.stderr)
            return "failed"
        return status


def _scheduler_signals() -> tuple[int, ...]:
    """submitit warns a job of its time limit (or preemption) with SIGUSR2 by default: the run
    then stops like on SIGTERM, keeps its samples, and a resume reruns it."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return ()
    try:
        from submitit.core.job_environment import JobEnvironment

        return (JobEnvironment._usr_sig(),)
    except Exception:  # noqa: BLE001 - an older or newer submitit: keep its own handler
        return ()


def _discard_unstarted(out: Path) -> None:
    """A point folder the launcher made (only .hydra/ inside) for a job that never ran."""
    if out.is_dir() and all(p.name == ".hydra" for p in out.iterdir()):
        shutil.rmtree(out, ignore_errors=True)


def set_aside(sweep_dir: Path, folder: Path, keep_hydra: bool = False) -> str | None:
    """Move an earlier attempt of a point to ``.attempts/<num>-<k>`` so its rerun starts in a
    clean folder and nothing it wrote is lost. Returns the new place, relative to the sweep."""
    if not folder.exists():
        return None
    if not (folder / "status").exists():
        _discard_unstarted(folder)
        if not folder.exists():
            return None
    attempts = sweep_dir / ATTEMPTS
    attempts.mkdir(exist_ok=True)
    k = 1
    while True:
        dest = attempts / f"{folder.name}-{k}"
        try:
            dest.mkdir()
            break
        except FileExistsError:
            k += 1
    dest.rmdir()
    os.replace(folder, dest)
    if keep_hydra and (dest / ".hydra").is_dir():
        folder.mkdir()
        shutil.copytree(dest / ".hydra", folder / ".hydra")
    return str(dest.relative_to(sweep_dir))


def still_running(run: Path) -> bool:
    """Whether a point that says ``running`` is really running (its process on this host, or
    its SLURM job), rather than a run killed too hard to say so."""
    from tokctl.runs import read_json

    env = read_json(run / "env.json") or {}
    pid, host = env.get("pid"), env.get("host")
    if pid and host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    slurm_id = (env.get("env") or {}).get("SLURM_JOB_ID")
    if slurm_id and shutil.which("squeue"):
        try:
            out = subprocess.run(["squeue", "-h", "-j", str(slurm_id)], capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return True  # cannot tell: do not run a point twice at once
        return bool(out.stdout.strip())
    return False


# ------------------------------------------------------------------------ locking, signals
@contextmanager
def sweep_lock(sweep_dir: Path) -> Iterator[None]:
    """One tokctl process per sweep folder at a time."""
    import fcntl

    fd = os.open(sweep_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            raise UserError(f"another tokctl process{f' ({holder})' if holder else ''} is running "
                            f"the sweep in {sweep_dir}; wait for it or choose another "
                            f"hydra.sweep.dir=PATH") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _child_pids() -> list[int]:
    """This process's children (the submitit job controllers), read from /proc."""
    me, kids = os.getpid(), []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return kids
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and fields[1] == str(me):
            kids.append(int(entry))
    return kids


@dataclass
class _Stop:
    signum: int | None = None


@contextmanager
def parent_signals(kind: str, sweep_dir: Path, stop: _Stop) -> Iterator[None]:
    """SIGINT/SIGTERM while the launcher waits.

    basic: the jobs run here, so the signal interrupts the current job and ends the sweep.
    local: each job stops and saves what it finished, then the sweep ends as interrupted; jobs
    not started yet do not start. SIGINT is blocked while the job processes are made: they inherit
    the mask, so a terminal's Ctrl-C skips submitit's controllers (which would answer it by
    SIGKILLing their job a second later) and reaches each job once its own handler is up. The
    parent takes its SIGINT in a helper thread and passes it on as SIGTERM, which the controllers
    forward to their jobs.
    slurm and others: stop waiting; jobs not started yet do not start (they see the stop mark),
    running ones finish on their own.
    """
    import threading

    from tokctl.runs import interrupts_as_exceptions

    if kind == "basic":
        with interrupts_as_exceptions():
            yield
        return

    def stop_jobs(signum: int) -> None:
        first = stop.signum is None
        stop.signum = signum
        try:
            (sweep_dir / STOP).touch()
        except OSError:
            pass
        for pid in _child_pids():
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        if first:
            os.write(2, b"tokctl: interrupting the sweep: its jobs are saving what they "
                        b"finished\n")

    def handler(signum, frame):  # noqa: ARG001
        if kind == "local":
            stop_jobs(signum)
            return
        stop.signum = signum
        try:
            (sweep_dir / STOP).touch()
        except OSError:
            pass
        raise KeyboardInterrupt

    try:
        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield
        return
    waiter, done = None, threading.Event()
    if kind == "local":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

        def wait_for_sigint() -> None:
            while not done.is_set():
                if signal.sigtimedwait({signal.SIGINT}, 0.2) is not None:
                    stop_jobs(signal.SIGINT)

        waiter = threading.Thread(target=wait_for_sigint, name="tokctl-sigint", daemon=True)
        waiter.start()
    try:
        yield
    finally:
        if waiter is not None:
            done.set()
            waiter.join()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        for s, h in old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- sweep.json
def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def point_rows(sweep_dir: Path, plan: Plan, spec_keys: set[tuple[str, ...]]) -> list[dict[str, Any]]:
    from tokctl.report import HEADLINE, scalar_metrics
    from tokctl.runs import read_json, read_status

    rows = []
    for p in sorted(plan.points, key=lambda p: p.num):
        folder = sweep_dir / p.dir
        metrics = scalar_metrics(read_json(folder / "metrics.json"))
        rows.append({
            "num": p.num, "dir": p.dir, "overrides": p.overrides,
            "status": read_status(folder) or "pending",
            "in_grid": p.key in spec_keys,
            "attempts": p.attempts,
            "metrics": {k: metrics[k] for k in HEADLINE if k in metrics},
        })
    return rows


def write_sweep_json(sweep_dir: Path, summary: dict[str, Any], plan: Plan,
                     spec_keys: set[tuple[str, ...]]) -> dict[str, Any]:
    from tokctl.runs import atomic_write_json

    rows = point_rows(sweep_dir, plan, spec_keys)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary.update(updated=_now(), points=rows, counts=counts)
    atomic_write_json(sweep_dir / SWEEP_JSON, summary)
    return summary


def find_sweep(root: Path, command_folder: str, spec: list[str]) -> Path | None:
    """The newest sweep under ``root/<command>`` with these overrides."""
    from tokctl.runs import read_json

    base = Path(root) / command_folder
    found = []
    for f in base.glob(f"*/*/{SWEEP_JSON}"):
        data = read_json(f) or {}
        if sorted(data.get("spec", [])) == spec:
            found.append((str(data.get("created", "")), f.stat().st_mtime, f.parent))
    return max(found)[2] if found else None


# ----------------------------------------------------------------------------------- run it
@dataclass
class SweepResult:
    path: Path
    counts: dict[str, int]
    complete: bool  # every point of the grid completed


def run_sweep(job, overrides: list[str]) -> SweepResult:
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from tokctl.config import common_searchpath, conf_dir, sweep_points
    from tokctl.jobs import load_target
    from tokctl.runs import check_writable, new_run_dir, read_json, read_status

    req = parse_request(overrides)
    for o in req.task:
        if o.startswith("-"):
            raise UserError(f"unknown option {o!r}; configs are changed with key=value overrides "
                            f"(see --help)")
    grid = sweep_points(req.task)
    load_target(job)
    hydra_defaults = [o for o, key in (("hydra/job_logging=none", "hydra/job_logging"),
                                       ("hydra/hydra_logging=none", "hydra/hydra_logging"))
                      if not any(h.startswith(key + "=") for h in req.hydra)]
    errors = (HydraException, OmegaConfBaseException, ValueError)

    with initialize_config_dir(config_dir=str(conf_dir(job.conf)), version_base="1.3",
                               job_name=f"tokctl-{job.run_folder_name}"):
        hydra = GlobalHydra.instance().hydra
        assert hydra is not None

        def master_config(sweep_dir: str):
            from hydra.types import RunMode

            try:
                return hydra.compose_config(
                    config_name=job.config_name, run_mode=RunMode.MULTIRUN,
                    overrides=[*req.task, *req.hydra, *hydra_defaults, common_searchpath(),
                               f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}"],
                    with_log_configuration=False)
            except errors as exc:
                raise _launcher_error(req, exc) from None

        def point_config(master, point: list[str], subdir: str):
            from hydra.core.hydra_config import HydraConfig
            from omegaconf import open_dict

            try:
                cfg = hydra.config_loader.load_sweep_config(
                    master, [*point, f"hydra.sweep.subdir={subdir}"])
                HydraConfig.instance().set_config(cfg)
                task = copy.deepcopy(cfg)
                with open_dict(task):
                    del task["hydra"]
                OmegaConf.resolve(task)
            except errors as exc:
                raise UserError(f"sweep point {' '.join(point)}: {one_line(str(exc))}") from None
            return task

        # 1. every point composes, before any folder is made
        probe = master_config(req.sweep_dir or "unused")
        kind = launcher_kind(probe)
        if kind == "slurm" and not shutil.which("sbatch"):
            raise UserError("this launcher submits SLURM jobs with sbatch, which is not on PATH: "
                            "run the sweep on the cluster's login node, or use "
                            "hydra/launcher=submitit_local on this machine")
        configs = [point_config(probe, point, str(i)) for i, point in enumerate(grid)]
        root = Path(str(configs[0].get("runs_dir") or "runs"))

        # 2. the sweep folder
        sweep_dir = _sweep_folder(req, job, root, check_writable, new_run_dir)
        with sweep_lock(sweep_dir):
            earlier = read_json(sweep_dir / SWEEP_JSON)
            if earlier is not None and req.resume is None:
                raise UserError(f"{sweep_dir} already holds a sweep; add +resume=true to rerun "
                                f"its unfinished points, or choose another hydra.sweep.dir=PATH")
            plan = Plan.from_json(earlier)
            points = [plan.add(point) for point in grid]
            spec_keys = {p.key for p in points}
            try:
                (sweep_dir / STOP).unlink()
            except FileNotFoundError:
                pass

            # 3. what runs now: everything of the grid that has not completed
            to_run, skipped, busy = [], [], []
            for p in points:
                folder = sweep_dir / p.dir
                status = read_status(folder)
                if status == "completed":
                    skipped.append(p)
                elif status == "running" and still_running(folder):
                    busy.append(p)
                else:
                    moved = set_aside(sweep_dir, folder)
                    if moved:
                        p.attempts.append(moved)
                    to_run.append(p)

            master = master_config(str(sweep_dir))
            kind = launcher_kind(master)
            extra = _thread_share(kind, to_run, configs, points)
            summary = dict(earlier or {})
            summary.update(command=job.command, spec=req.spec, launcher=_launcher_name(master),
                           state="running")
            summary.setdefault("created", _now())
            invocation = {"started": _now(), "argv": sys.argv, "host": socket.gethostname(),
                          "launched": [p.num for p in to_run], "skipped": [p.num for p in skipped],
                          "still_running": [p.num for p in busy]}
            summary["invocations"] = [*summary.get("invocations", []), invocation]
            write_sweep_json(sweep_dir, summary, plan, spec_keys)
            OmegaConf.save(master, sweep_dir / "multirun.yaml")
            _print_plan(sweep_dir, summary["launcher"], to_run, skipped, busy, extra)

            # 4. launch
            stop = _Stop()
            start = time.perf_counter()
            launch_error = None
            try:
                if to_run:
                    _launch(hydra, master, job, sweep_dir, to_run, extra, kind, stop)
            except KeyboardInterrupt:
                stop.signum = stop.signum or signal.SIGINT
            except Exception as exc:  # noqa: BLE001 - a launcher's failure: one line, statuses kept
                launch_error = one_line(f"{type(exc).__name__}: {exc}")
            finally:
                invocation.update(finished=_now(), wall_s=round(time.perf_counter() - start, 3))
                summary["state"] = "interrupted" if stop.signum else "finished"
                if launch_error:
                    invocation["launcher_error"] = launch_error
                summary = write_sweep_json(sweep_dir, summary, plan, spec_keys)

    _print_summary(sweep_dir, summary, spec_keys, invocation)
    if launch_error:
        err_console.print(f"[bold red]error:[/] the launcher failed: {launch_error}", soft_wrap=True)
    if stop.signum:
        raise KeyboardInterrupt
    grid_rows = [r for r in summary["points"] if r["in_grid"]]
    counts: dict[str, int] = {}
    for r in grid_rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return SweepResult(path=sweep_dir, counts=counts,
                       complete=all(r["status"] == "completed" for r in grid_rows))


def _sweep_folder(req: Request, job, root: Path, check_writable, new_run_dir) -> Path:
    if req.resume not in (None, "true"):
        path = Path(req.resume)
        if req.sweep_dir and Path(req.sweep_dir).resolve() != path.resolve():
            raise UserError(f"+resume={req.resume} and hydra.sweep.dir={req.sweep_dir} name "
                            f"different sweeps; give one of them")
        if not (path / SWEEP_JSON).is_file():
            raise UserError(f"+resume={req.resume}: no sweep there (no {SWEEP_JSON}); give the "
                            f"folder `tokctl {job.command} -m` printed")
        check_writable(path)
        return path
    if req.sweep_dir:
        path = Path(req.sweep_dir)
        check_writable(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the sweep folder {path}: {exc.strerror or exc}") from None
        return path
    if req.resume == "true":
        found = find_sweep(root, job.run_folder_name, req.spec)
        if found is None:
            raise UserError(f"no earlier sweep with these overrides under {root / job.run_folder_name} "
                            f"to resume; give its folder with +resume=PATH")
        check_writable(found)
        return found
    check_writable(root)
    return new_run_dir(root, job.run_folder_name, "sweep")


def _launcher_name(master) -> str:
    from omegaconf import OmegaConf

    choice = OmegaConf.select(master, "hydra.runtime.choices", default=None) or {}
    return str(choice.get("hydra/launcher") or launcher_kind(master))


def _thread_share(kind: str, to_run: list[Point], configs, points: list[Point]) -> dict[int, str]:
    """Parallel local jobs split this machine's CPUs, so that ``threads=auto`` does not put
    N jobs x all cores on it; the choice is written into each point's config."""
    if kind != "local" or len(to_run) < 2:
        return {}
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cpus // len(to_run))
    by_num = {p.num: cfg for p, cfg in zip(points, configs)}
    extra = {}
    for p in to_run:
        cfg = by_num.get(p.num)
        typed = any(o.split("=", 1)[0].lstrip("+") == "threads" for o in p.overrides)
        if cfg is not None and "threads" in cfg and not typed and str(cfg.threads) in ("auto", "0", "None"):
            extra[p.num] = f"threads={share}"
    return extra


def _launch(hydra, master, job, sweep_dir: Path, to_run: list[Point], extra: dict[int, str],
            kind: str, stop: _Stop) -> None:
    from hydra._internal.callbacks import Callbacks
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext

    launcher = Plugins.instance().instantiate_launcher(
        hydra_context=HydraContext(config_loader=hydra.config_loader, callbacks=Callbacks(master)),
        task_function=PointTask(job, sweep_dir), config=master)
    job_overrides = [[*p.overrides, *([extra[p.num]] if p.num in extra else []),
                      f"hydra.sweep.subdir={p.dir}"] for p in to_run]
    with parent_signals(kind, sweep_dir, stop):
        launcher.launch(job_overrides, initial_job_idx=0)


def _swept_keys(points: list[dict[str, Any]]) -> list[str]:
    values: dict[str, set[str]] = {}
    for r in points:
        for o in r["overrides"]:
            k, _, v = o.partition("=")
            values.setdefault(k, set()).add(v)
    return [k for k, vs in values.items() if len(vs) > 1]


def _short(overrides: list[str], keys: list[str]) -> str:
    shown = [o for o in overrides if o.partition("=")[0] in keys]
    return " ".join(shown or overrides)


def _print_plan(sweep_dir: Path, launcher: str, to_run, skipped, busy, extra) -> None:
    msg = f"[bold]sweep[/] {sweep_dir}: {len(to_run)} to run with launcher {launcher}"
    if skipped:
        msg += f", {len(skipped)} completed earlier (skipped)"
    if busy:
        msg += f", {len(busy)} still running elsewhere (left alone)"
    if extra:
        msg += f"; {next(iter(extra.values()))} per parallel job"
    err_console.print(msg, soft_wrap=True)


def _print_summary(sweep_dir: Path, summary: dict[str, Any], spec_keys, invocation) -> None:
    from rich.table import Table

    from tokctl.report import fmt, status_markup

    rows = [r for r in summary["points"] if r["in_grid"]]
    keys = _swept_keys(rows)
    metric_names = list(dict.fromkeys(k for r in rows for k, v in r["metrics"].items()
                                      if v is not None))[:3]
    table = Table(title=f"sweep: {len(rows)} points in {invocation.get('wall_s', 0):.1f} s "
                        f"({summary['launcher']})")
    table.add_column("#", justify="right")
    table.add_column("point", overflow="fold")
    table.add_column("status", no_wrap=True)
    for m in metric_names:  # values are never cut: headers fold instead
        table.add_column(m, justify="right", overflow="fold",
                         min_width=max(len(fmt(r["metrics"].get(m))) for r in rows))
    launched = set(invocation.get("launched", []))
    for r in rows:
        status = status_markup(r["status"]) + ("" if r["num"] in launched else " [dim](earlier)[/]")
        table.add_row(r["dir"], _short(r["overrides"], keys), status,
                      *[fmt(r["metrics"].get(m)) for m in metric_names])
    console.print(table)
