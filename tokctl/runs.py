"""The run folder: where every command writes what it did, so that nothing finished is ever lost.

Layout (see DESIGN.md)::

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
from typing import Any, Iterator

from tokctl.errors import UserError

STATUSES = ("running", "completed", "failed", "interrupted")


# ----------------------------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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
    parent.mkdir(parents=True, exist_ok=True)
    stem = f"{now.strftime('%H-%M-%S')}_{safe}"
    for i in range(1, 10_000):
        path = parent / (stem if i == 1 else f"{stem}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f"could not create a fresh run folder under {parent}")


def check_writable(folder: Path | str, min_free_mb: int = 50) -> None:
    """Fail in one line, before any model is loaded, if the run folder cannot take our output."""
    folder = Path(folder)
    probe_dir = folder
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not os.access(probe_dir, os.W_OK):
        raise UserError(f"cannot write run output under {folder}: {probe_dir} is not writable "
                        f"(choose another place with runs_dir=PATH or hydra.run.dir=PATH)")
    free_mb = _free_mb(probe_dir)
    if free_mb is not None and free_mb < min_free_mb:
        raise UserError(f"only {free_mb:.0f} MB free on the disk holding {probe_dir}; "
                        f"free some space or choose another place with runs_dir=PATH")


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
        "cwd": os.getcwd(),
        "git_commit": _git_commit(),
        "packages": {},
        "env": {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET",
                                           "TOKCTL_TRITON", "OMP_NUM_THREADS", "SLURM_JOB_ID")
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
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if (path / "status").exists() or (path / "samples.jsonl").exists():
            raise UserError(f"{path} already holds a run; choose another hydra.run.dir=PATH")
        run = cls(path)
        atomic_write_text(path / "config.yaml", config_yaml)
        run.write_env()
        run.set_status("running")
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
        """One line per sample, written with a single write() and flushed to disk at once, so a
        killed run never leaves half a line."""
        if self._samples is None:
            self._samples = os.open(self.path / "samples.jsonl",
                                    os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        line = (to_json(row, indent=None) + "\n").encode("utf-8")
        with _signals_deferred():
            os.write(self._samples, line)
            os.fsync(self._samples)

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.path / name, obj)

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.path / name, text)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        self.write_json("metrics.json", metrics)

    def set_status(self, status: str) -> None:
        assert status in STATUSES, status
        atomic_write_text(self.path / "status", status + "\n")

    def fail(self, message: str) -> None:
        atomic_write_text(self.path / "error.txt", message.rstrip() + "\n")
        self.set_status("failed")

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
    """Raised in the main thread on SIGTERM, so a killed job unwinds like Ctrl-C."""


_deferred: list[int] = []
_deferring = 0


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while a sample line is written; re-raise them right after."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if _deferring == 0 and _deferred:
            signum = _deferred.pop()
            _deferred.clear()
            raise Interrupted(f"signal {signum}")


def _handler(signum, frame):  # noqa: ARG001
    if _deferring:
        _deferred.append(signum)
        return
    raise Interrupted(f"signal {signum}")


@contextmanager
def interrupts_as_exceptions() -> Iterator[None]:
    """SIGINT and SIGTERM both become :class:`Interrupted` while a job runs."""
    try:
        old_int = signal.signal(signal.SIGINT, _handler)
        old_term = signal.signal(signal.SIGTERM, _handler)
    except ValueError:  # not the main thread (e.g. a launcher's worker): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


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
    """Every run folder below ``root`` (or ``root`` itself), newest first."""
    root = Path(root)
    if is_run_dir(root):
        return [root]
    found = [p.parent for p in root.rglob("status") if is_run_dir(p.parent)]
    return sorted(found, key=lambda p: (p / "config.yaml").stat().st_mtime, reverse=True)
