"""The run folder's guarantees, piece by piece: atomic files, whole sample lines, exclusive
folders, one-line checks of the output place. (Real processes and signals: test_signals.py.)"""

import errno
import json
import os
import signal
import threading
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tokctl import runs
from tokctl.errors import UserError
from tokctl.jobs import Job, execute
from tokctl.runs import (Interrupted, Run, atomic_torch_save, atomic_write_json, check_writable,
                         find_runs, interrupts_as_exceptions, new_run_dir, read_samples)


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------- atomic files
def test_a_write_that_dies_half_way_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"top1": 0.5})

    def dying_fsync(fd):
        raise OSError(errno.EIO, "disk went away")

    monkeypatch.setattr(runs.os, "fsync", dying_fsync)
    with pytest.raises(OSError):
        atomic_write_json(target, {"top1": 0.9})
    assert json.loads(target.read_text()) == {"top1": 0.5}
    assert leftovers(tmp_path) == []


def test_checkpoints_are_saved_atomically(tmp_path, monkeypatch):
    import torch

    target = tmp_path / "ckpt.pt"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, target)
    monkeypatch.setattr(runs.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"step": 2, "w": torch.zeros(3)}, target)
    assert torch.load(target)["step"] == 1
    assert leftovers(tmp_path) == []


def test_run_files_are_readable_by_the_group(tmp_path):
    atomic_write_json(tmp_path / "m.json", {})
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o666 & ~runs._UMASK


def test_nan_and_inf_are_stored_as_null(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"a": float("nan"), "b": [float("inf"), 1.0]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": None, "b": [None, 1.0]}


# ------------------------------------------------------------------------------ sample lines
def test_a_failed_sample_write_leaves_no_half_line(tmp_path, monkeypatch):
    run = Run.create(tmp_path / "r", "a: 1\n")
    run.append_sample({"i": 0})
    real_write = os.write

    def disk_full_half_way(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs.os, "write", disk_full_half_way)
    with pytest.raises(OSError):
        run.append_sample({"i": 1, "text": "x" * 1000})
    monkeypatch.setattr(runs.os, "write", real_write)
    run.append_sample({"i": 2})
    run.close()
    assert [r["i"] for r in read_samples(run.path)] == [0, 2]
    assert (run.path / "samples.jsonl").read_text().count("\n") == 2


def test_a_signal_during_a_sample_write_takes_the_line_back_and_interrupts(tmp_path, monkeypatch):
    """All or nothing: when append_sample raises, the file is as it was, so a job's own count
    of finished samples (what it writes in its partial metrics) matches the file."""
    run = Run.create(tmp_path / "r", "a: 1\n")
    real_fsync = os.fsync

    def fsync_with_a_signal(fd):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the line is being written
        real_fsync(fd)

    with interrupts_as_exceptions():
        run.append_sample({"i": 0})
        monkeypatch.setattr(runs.os, "fsync", fsync_with_a_signal)
        with pytest.raises(Interrupted):
            run.append_sample({"i": 1})
    run.close()
    assert read_samples(run.path) == [{"i": 0}]


def test_a_torn_last_line_from_a_hard_kill_is_skipped_when_reading(tmp_path):
    (tmp_path / "samples.jsonl").write_text('{"i": 0}\n{"i": 1}\n{"i": 2, "te')
    assert read_samples(tmp_path) == [{"i": 0}, {"i": 1}]


# ---------------------------------------------------------------------------- run folders
def test_only_one_of_many_racing_creators_gets_a_run_folder(tmp_path):
    won, lost = [], []
    barrier = threading.Barrier(8)

    def claim(i):
        barrier.wait()
        try:
            won.append(Run.create(tmp_path / "same", f"i: {i}\n"))
        except UserError as exc:
            lost.append(str(exc))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 7 and all("already holds a run" in m for m in lost)


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    import datetime as dt

    class FrozenClock(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(runs._dt, "datetime", FrozenClock)
    made, barrier = [], threading.Barrier(10)

    def make():
        barrier.wait()
        made.append(new_run_dir(tmp_path, "decode", "sweep"))

    threads = [threading.Thread(target=make) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 10
    assert min(made).name == "03-04-05_sweep" and all(p.is_dir() for p in made)


def test_find_runs_skips_earlier_attempts_and_tool_folders(tmp_path):
    for rel in ("s/0", "s/1", "s/.attempts/1-1", "s/.submitit/x"):
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "status").write_text("completed\n")
        (tmp_path / rel / "config.yaml").write_text("a: 1\n")
    assert sorted(p.name for p in find_runs(tmp_path)) == ["0", "1"]


# ------------------------------------------------------------------------ the output place
def test_check_writable_names_what_is_wrong(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is not a folder"):
        check_writable(tmp_path / "file" / "runs")
    with pytest.raises(UserError, match="is not writable"):
        check_writable("/sys/tokctl-runs")  # read-only even for root
    monkeypatch.setenv("TOKCTL_MIN_FREE_MB", str(10**12))
    with pytest.raises(UserError, match="MB free"):
        check_writable(tmp_path / "runs")
    monkeypatch.setenv("TOKCTL_MIN_FREE_MB", "lots")
    with pytest.raises(UserError, match="TOKCTL_MIN_FREE_MB"):
        check_writable(tmp_path / "runs")
    monkeypatch.setenv("TOKCTL_MIN_FREE_MB", "1")
    check_writable(tmp_path / "runs" / "deeper")  # a folder that does not exist yet is fine
    assert not (tmp_path / "runs").exists()  # and the check leaves nothing behind


def test_the_final_status_is_written_even_without_room_for_a_new_file(tmp_path, monkeypatch):
    run = Run.create(tmp_path / "r", "a: 1\n")

    def no_room(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs, "atomic_write_text", no_room)
    run.fail("disk full")  # cannot write error.txt: must not raise
    assert (run.path / "status").read_text() == "failed\n"


# --------------------------------------------------------------------------------- execute
def exiting_job(cfg, run):
    raise SystemExit(3)


def test_a_job_that_exits_is_a_failed_run(tmp_path, monkeypatch):
    import tokctl.jobs

    monkeypatch.setattr(tokctl.jobs, "load_target", lambda job: exiting_job)
    cfg = OmegaConf.create({"threads": 1, "seed": 0})
    with pytest.raises(SystemExit):
        execute(Job("x", "decode", "decode", "unused", "test"), cfg, tmp_path / "r")
    assert (tmp_path / "r" / "status").read_text() == "failed\n"
    assert "SystemExit" in (tmp_path / "r" / "error.txt").read_text()


def mistaken_job(cfg, run):
    raise UserError("budgets [999]: this tokenizer makes 1 to 64 tokens")


def late_mistake_job(cfg, run):
    run.append_sample({"index": 0})
    raise UserError("the second prompt file is empty")


def test_a_mistake_caught_before_any_work_leaves_no_failed_folder(tmp_path, monkeypatch):
    import tokctl.jobs
    from tokctl.jobs import JOBS, run_single

    root = tmp_path / "runs"
    monkeypatch.setattr(tokctl.jobs, "load_target", lambda job: mistaken_job)
    with pytest.raises(UserError, match=r"999.*no run folder kept"):
        run_single(JOBS["decode"], [f"runs_dir={root}", "threads=1"])
    assert find_runs(root) == []
    # once a sample is written the folder holds work: it stays, marked failed, with the reason
    monkeypatch.setattr(tokctl.jobs, "load_target", lambda job: late_mistake_job)
    with pytest.raises(UserError, match="empty"):
        run_single(JOBS["decode"], [f"runs_dir={root}", "threads=1"])
    [kept] = find_runs(root)
    assert (kept / "status").read_text() == "failed\n" and read_samples(kept) == [{"index": 0}]
    assert "empty" in (kept / "error.txt").read_text()
