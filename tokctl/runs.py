"""The run folder: where every command writes what it did, so that nothing finished is ever lost.

Layout::

    config.yaml     resolved config, written before any work starts
    env.json        versions, device, threads, git commit, command line
    samples.jsonl   one JSON object per sample, appended and flushed as it goes
    metrics.json    aggregates, written atomically at the end
    status          running | completed | failed | interrupted
    error.txt       the reason, when status is failed

Only these files are read back by ``tokctl runs`` and ``tokctl report``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from tokctl.errors import UserError

STATUSES = ("running", "completed", "failed", "interrupted")


# ----------------------------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide runs from a shared group
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: os.umask can only be read by setting it


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean(obj: Any) -> Any:
    """NaN and inf are not JSON: store them as null so every reader can parse the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def to_json(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(_clean(obj), indent=indent, default=_json_default, ensure_ascii=False)


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, to_json(obj) + "\n")


def atomic_torch_save(obj: Any, path: Path | str) -> None:
    """torch.save through a temporary file, so an interrupted checkpoint never replaces a good one."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------------ run folders
def new_run_dir(root: Path | str, command: str, name: str) -> Path:
    """``root/<command>/<date>/<time>_<name>``, created exclusively.

    Two processes starting in the same second get different folders: ``mkdir`` without
    ``exist_ok`` is atomic, and the loser takes the next suffix.
    """
    now = _dt.datetime.now()
    safe = re.sub(r"[^A-Za-z0-9._=,+-]+", "-", name).strip("-") or "run"
    parent = Path(root) / command / now.strftime("%Y-%m-%d")
    stem = f"{now.strftime('%H-%M-%S')}_{safe}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for i in range(1, 10_000):
            path = parent / (stem if i == 1 else f"{stem}-{i}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as exc:
        raise UserError(f"cannot create a run folder under {parent}: {exc.strerror or exc} "
                        f"(choose another place with runs_dir=PATH)") from None
    raise UserError(f"could not create a fresh run folder under {parent}")


MIN_FREE_MB_ENV = "TOKCTL_MIN_FREE_MB"


def min_free_mb() -> float:
    """Free space a run needs before it starts: 50 MB, or $TOKCTL_MIN_FREE_MB."""
    raw = os.environ.get(MIN_FREE_MB_ENV, "50")
    try:
        return float(raw)
    except ValueError:
        raise UserError(f"{MIN_FREE_MB_ENV}={raw!r} must be a number of megabytes") from None


def check_writable(folder: Path | str, min_free: float | None = None) -> None:
    """Fail in one line, before any model is loaded, if the run folder cannot take our output.

    Writes and removes a probe file in the nearest existing folder: permission bits alone do not
    tell (root ignores them; a read-only mount or a full quota does not show in them).
    """
    folder = Path(folder)
    probe_dir = folder
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    hint = "choose another place with runs_dir=PATH or hydra.run.dir=PATH"
    if not probe_dir.is_dir():
        raise UserError(f"cannot write run output under {folder}: {probe_dir} is not a folder "
                        f"({hint})")
    try:
        fd, probe = tempfile.mkstemp(prefix=".tokctl-probe-", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"cannot write run output under {folder}: {probe_dir} is not writable "
                        f"({exc.strerror or exc}; {hint})") from None
    need = min_free_mb() if min_free is None else min_free
    free_mb = _free_mb(probe_dir)
    if free_mb is not None and free_mb < need:
        raise UserError(f"only {free_mb:.0f} MB free on the disk holding {probe_dir} (a run needs "
                        f"{need:.0f} MB, set by {MIN_FREE_MB_ENV}); free some space or {hint}")


def _free_mb(path: Path) -> float | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize / 2**20


def _git_commit() -> str | None:
    src = Path(__file__).resolve().parent.parent
    if not (src / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment() -> dict[str, Any]:
    """What a reader needs to judge a figure: versions, hardware, threads, commit, command line."""
    import importlib.metadata as md

    env: dict[str, Any] = {
        "time": _dt.datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "argv": sys.argv,
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "git_commit": _git_commit(),
        "packages": {},
        "env": {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET",
                                           "TOKCTL_TRITON", "OMP_NUM_THREADS", "SLURM_JOB_ID",
                                           "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",
                                           "SUBMITIT_EXECUTOR")
                if k in os.environ},
    }
    for pkg in ("tokctl", "torch", "transformers", "triton", "hydra-core", "numpy", "timm"):
        try:
            env["packages"][pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    if "torch" in sys.modules:
        import torch

        env["torch_threads"] = torch.get_num_threads()
        env["torch_interop_threads"] = torch.get_num_interop_threads()
        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            env["cuda_device"] = torch.cuda.get_device_name(0)
    return env


class Run:
    """An open run folder. Jobs receive one and write through it only."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._samples = None

    # --- creation -------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path | str, config_yaml: str) -> "Run":
        """Claim ``path`` for a new run. The claim is the exclusive creation of ``status``, so two
        processes pointed at the same folder can never both write into it."""
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path / "status", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise UserError(f"{path} already holds a run; choose another hydra.run.dir=PATH") from None
        except OSError as exc:
            raise UserError(f"cannot create the run folder {path}: {exc.strerror or exc} "
                            f"(choose another place with runs_dir=PATH)") from None
        try:
            os.write(fd, b"running\n")
        finally:
            os.close(fd)
        if (path / "samples.jsonl").exists():
            raise UserError(f"{path} already holds samples of another run; choose another "
                            f"hydra.run.dir=PATH")
        run = cls(path)
        try:
            atomic_write_text(path / "config.yaml", config_yaml)
            run.write_env()
        except OSError as exc:
            run.fail(f"cannot write into the run folder: {exc}")
            raise UserError(f"cannot write into the run folder {path}: {exc.strerror or exc}") from None
        return run

    def write_env(self, **extra: Any) -> None:
        env = environment()
        env.update(extra)
        atomic_write_json(self.path / "env.json", env)

    def update_env(self, **extra: Any) -> None:
        """Add facts learned during the run (threads chosen, device, dtype) to env.json."""
        env = read_json(self.path / "env.json") or {}
        env.update(extra)
        atomic_write_json(self.path / "env.json", env)

    # --- writing --------------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        return self.path / name

    def append_sample(self, row: dict[str, Any]) -> None:
        """Append one line to samples.jsonl and flush it to disk, all or nothing: when this
        raises, the file is as it was, so a job's own count of samples always matches the file.

        SIGINT/SIGTERM cannot cut the write in two: one that arrives meanwhile undoes the line
        and interrupts (as if it had come just before); so does a failed write (a full disk).
        """
        if self._samples is None:
            self._samples = os.open(self.path / "samples.jsonl",
                                    os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        line = (to_json(row, indent=None) + "\n").encode("utf-8")
        fd = self._samples
        start = os.lseek(fd, 0, os.SEEK_END)

        def undo() -> None:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass

        with _signals_deferred(undo=undo):
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except BaseException:
                undo()
                raise

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.path / name, obj)

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.path / name, text)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        self.write_json("metrics.json", metrics)

    def set_status(self, status: str) -> None:
        assert status in STATUSES, status
        write_status(self.path, status)

    def fail(self, message: str) -> None:
        """Record why the run failed. Never raises: it runs while another error unwinds, perhaps
        on a full disk, where the status matters more than the message."""
        try:
            atomic_write_text(self.path / "error.txt", message.rstrip() + "\n")
        except OSError as exc:
            print(f"tokctl: could not write {self.path / 'error.txt'} ({exc}): {message.strip()}",
                  file=sys.stderr)
        try:
            self.set_status("failed")
        except OSError as exc:
            print(f"tokctl: could not mark {self.path} failed: {exc}", file=sys.stderr)

    def close(self) -> None:
        if self._samples is not None:
            os.close(self._samples)
            self._samples = None

    # --- reading --------------------------------------------------------------------------------
    @property
    def status(self) -> str | None:
        return read_status(self.path)

    def samples(self) -> list[dict[str, Any]]:
        return read_samples(self.path)


# --------------------------------------------------------------------------------------- signals
class Interrupted(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM (and SIGINT), so a killed job unwinds like Ctrl-C."""


class _SignalState:
    deferring = 0  # > 0 while a sample line is being written
    deferred: int | None = None  # a signal that arrived meanwhile
    received: int | None = None  # the signal being acted on: later ones must not cut the clean-up


_state = _SignalState()


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@contextmanager
def _signals_deferred(undo: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the block runs; one that arrived meanwhile interrupts right
    after it, once ``undo`` (if given) has taken back what the block did."""
    _state.deferring += 1
    try:
        yield
    except BaseException as exc:
        _state.deferring -= 1
        if _state.deferring == 0 and _state.deferred is not None:
            raise _take_deferred() from exc
        raise
    _state.deferring -= 1
    if _state.deferring == 0 and _state.deferred is not None:
        if undo is not None:
            undo()
        raise _take_deferred()


def _take_deferred() -> Interrupted:
    signum, _state.deferred = _state.deferred, None
    _state.received = signum
    return Interrupted(_signal_name(signum))


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM during a run's last bookkeeping (closing files, the final status);
    one that arrived meanwhile interrupts right after."""
    with _signals_deferred():
        yield


def _handler(signum, frame):  # noqa: ARG001
    if _state.received is None and _state.deferring:
        _state.deferred = signum
        return
    if _state.received is not None:
        # The first signal is already unwinding the job (writing partial metrics, the status):
        # a second Ctrl-C or a launcher's forwarded SIGTERM must not cut that short.
        os.write(2, f"tokctl: {_signal_name(signum)} again: still saving the run, please "
                    f"wait\n".encode())
        return
    _state.received = signum
    raise Interrupted(_signal_name(signum))


@contextmanager
def interrupts_as_exceptions(extra: tuple[int, ...] = ()) -> Iterator[None]:
    """SIGINT, SIGTERM (and ``extra`` signals, e.g. a scheduler's time-limit warning) become
    :class:`Interrupted` while a job runs. Only the first one interrupts; later ones wait."""
    signums = (signal.SIGINT, signal.SIGTERM, *extra)
    try:
        old = {s: signal.signal(s, _handler) for s in signums}
    except ValueError:  # not the main thread (e.g. a launcher's worker): leave signals alone
        yield
        return
    outer = (_state.received, _state.deferred)
    _state.received = _state.deferred = None
    # A parallel sweep starts its jobs with SIGINT blocked (see tokctl.sweep.sweep_signals):
    # from here on the job handles it.
    old_mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, signums)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        for s, h in old.items():
            signal.signal(s, h)
        inner = _state.received
        _state.received, _state.deferred = outer
        if _state.received is None and isinstance(sys.exc_info()[1], KeyboardInterrupt):
            _state.received = inner  # an enclosing context is unwinding from the same signal


def write_status(path: Path | str, status: str) -> None:
    """Atomically; on a full disk (no room for the temporary file) rewrite the few bytes in place,
    which needs no new block, so that a run is never left saying ``running``."""
    target = Path(path) / "status"
    try:
        atomic_write_text(target, status + "\n")
    except OSError:
        with open(target, "r+b") as f:
            f.write((status + "\n").encode())
            f.truncate()
            f.flush()
            os.fsync(f.fileno())


# What creating a run writes before any work: a failed run holding only these did nothing.
CREATED_FILES = frozenset({"config.yaml", "env.json", "status", "error.txt"})


def discard_if_untouched(path: Path | str) -> bool:
    """Remove a failed run folder that holds nothing but what creating it wrote (no sample, no
    metrics, no output): a mistake caught before any work, whose one-line error already said
    everything, leaves no ``failed`` folder behind. Returns whether the folder was removed."""
    path = Path(path)
    try:
        names = {p.name for p in path.iterdir()}
    except OSError:
        return False
    if read_status(path) != "failed" or not names <= CREATED_FILES:
        return False
    try:
        for name in names:
            (path / name).unlink()
        path.rmdir()
    except OSError:
        return False
    try:  # the day's folder, when this was its only run
        path.parent.rmdir()
    except OSError:
        pass
    return True


# --------------------------------------------------------------------------------------- reading
def read_json(path: Path | str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_status(path: Path | str) -> str | None:
    try:
        return (Path(path) / "status").read_text().strip() or None
    except OSError:
        return None


def read_samples(path: Path | str) -> list[dict[str, Any]]:
    """Every complete line of samples.jsonl; a torn last line (a hard kill) is skipped."""
    rows = []
    try:
        with open(Path(path) / "samples.jsonl", encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    return rows


def is_run_dir(path: Path) -> bool:
    return (path / "status").is_file() and (path / "config.yaml").is_file()


def find_runs(root: Path | str) -> list[Path]:
    """Every run folder below ``root`` (or ``root`` itself), newest first.

    Hidden folders are skipped: they hold Hydra's and submitit's files and the earlier attempts
    of resumed sweep points (``.attempts/``), which must not count twice.
    """
    root = Path(root)
    if is_run_dir(root):
        return [root]
    found = [p.parent for p in root.rglob("status")
             if is_run_dir(p.parent)
             and not any(part.startswith(".") for part in p.parent.relative_to(root).parts)]
    return sorted(found, key=_mtime, reverse=True)


def _mtime(run: Path) -> float:
    try:
        return (run / "config.yaml").stat().st_mtime
    except OSError:  # removed while we looked
        return 0.0
