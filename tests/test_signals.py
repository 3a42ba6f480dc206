"""A run never loses data: real `tokctl` processes, real signals, a real full disk.

Besides the decode job on the tiny model, two test-only jobs run inside a real `tokctl` process
(registered by a small launcher script, see `tokctl_with_test_jobs`): `spam` appends big sample
lines as fast as the disk takes them, so that a signal lands in the middle of a write; `crash`
raises like a bug would.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------- test-only jobs
def spam_job(cfg, run):
    payload = "x" * (int(cfg.get("spam_kb", 256)) * 1024)
    done = 0
    try:
        for i in range(int(cfg.get("spam_lines", 10**6))):
            run.append_sample({"index": i, "size": len(payload), "payload": payload})
            done += 1
    except KeyboardInterrupt:
        time.sleep(float(cfg.get("spam_slow_save", 0)))  # a slow save that must not be cut short
        run.write_metrics({"samples": done, "partial": True})
        raise
    return {"samples": done}


def crash_job(cfg, run):
    run.append_sample({"index": 0})
    raise RuntimeError("boom: the model exploded")


LAUNCH = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from tokctl.jobs import JOBS, Job
for name in ("spam", "crash"):
    JOBS[name] = Job(name, "decode", "decode", f"test_signals:{{name}}_job", "a test job")
from tokctl.cli import main
sys.argv = ["tokctl", *sys.argv[1:]]
main()
"""


def tokctl_with_test_jobs(*args, **popen):
    return subprocess.Popen([sys.executable, "-c", LAUNCH, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def tokctl_process(*args, **popen):
    return subprocess.Popen([sys.executable, "-m", "tokctl.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def wait_for(predicate, timeout=120, what="the run to start"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def sample_lines(run: Path) -> list[dict]:
    """Every line must be whole JSON: a half line fails here."""
    text = (run / "samples.jsonl").read_text()
    assert text == "" or text.endswith("\n"), "samples.jsonl ends in half a line"
    return [json.loads(line) for line in text.splitlines()]


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --------------------------------------------------------------------------------- signals
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_in_the_middle_of_writing_leaves_whole_lines(tmp_path, signum):
    run = tmp_path / "run"
    proc = tokctl_with_test_jobs("spam", f"hydra.run.dir={run}", "++spam_kb=512", "threads=1")
    wait_for(lambda: size(run / "samples.jsonl") > 3 * 2**20, what="3 MB of samples")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert (run / "status").read_text() == "interrupted\n"
    rows = sample_lines(run)
    assert len(rows) >= 6 and all(r["size"] == len(r["payload"]) for r in rows)
    assert [r["index"] for r in rows] == list(range(len(rows)))
    assert json.loads((run / "metrics.json").read_text()) == {"samples": len(rows), "partial": True}
    assert "Traceback" not in err


def test_more_signals_while_saving_do_not_cut_the_save_short(tmp_path):
    run = tmp_path / "run"
    proc = tokctl_with_test_jobs("spam", f"hydra.run.dir={run}", "++spam_kb=64",
                                 "++spam_slow_save=1.5", "threads=1")
    wait_for(lambda: size(run / "samples.jsonl") > 2**20, what="1 MB of samples")
    proc.send_signal(signal.SIGINT)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
        time.sleep(0.2)
        proc.send_signal(signum)  # an impatient user, or a launcher passing the signal on
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert (run / "status").read_text() == "interrupted\n"
    assert json.loads((run / "metrics.json").read_text())["partial"] is True
    assert "still saving" in err and "Traceback" not in err
    sample_lines(run)


def test_sigterm_stops_a_decode_run_cleanly(tiny_lm_dir, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"count to {i}"}) + "\n" for i in range(500)))
    run = tmp_path / "run"
    proc = tokctl_process("decode", "model=hf", f"model.path={tiny_lm_dir}", "data=jsonl",
                          f"data.path={f}", "max_new_tokens=32", "warmup=0", "threads=1",
                          f"hydra.run.dir={run}")
    wait_for(lambda: len(sample_lines(run)) >= 2 if (run / "samples.jsonl").exists() else False)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert (run / "status").read_text() == "interrupted\n"
    rows = sample_lines(run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["partial"] is True and metrics["num_samples"] == len(rows) >= 2


def test_a_crash_leaves_failed_and_the_message(tmp_path):
    run = tmp_path / "run"
    proc = tokctl_with_test_jobs("crash", f"hydra.run.dir={run}", "threads=1")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert (run / "status").read_text() == "failed\n"
    error = (run / "error.txt").read_text()
    assert "RuntimeError: boom: the model exploded" in error and "Traceback" in error
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "boom" in lines[0] and "error.txt" in lines[0]
    assert sample_lines(run) == [{"index": 0}]


# ------------------------------------------------------------------------------- the disk
@pytest.fixture
def tiny_disk(tmp_path):
    """A real 2 MB filesystem (tmpfs); skipped where mounting is not allowed."""
    where = tmp_path / "disk"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_disk_filling_up_mid_run_leaves_failed_and_whole_lines(tiny_disk):
    run = tiny_disk / "run"
    proc = tokctl_with_test_jobs("spam", f"hydra.run.dir={run}", "++spam_kb=100", "threads=1",
                                 env={**os.environ, "TOKCTL_MIN_FREE_MB": "0"})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert (run / "status").read_text() == "failed\n"  # even with no room for a new file
    rows = sample_lines(run)
    assert 5 <= len(rows) <= 20 and all(r["size"] == len(r["payload"]) for r in rows)
    assert "No space left on device" in err and "Traceback" not in err


def test_a_full_disk_is_one_line_before_any_model_loads(tiny_lm_dir, tiny_disk):
    with open(tiny_disk / "filler", "wb") as f:  # fill it up for real
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    proc = tokctl_process("decode", "model=hf", f"model.path={tiny_lm_dir}",
                          f"runs_dir={tiny_disk / 'runs'}", env={**os.environ,
                                                                 "TOKCTL_MIN_FREE_MB": "1"})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "MB free" in lines[0] and "runs_dir=PATH" in lines[0]
    assert "loaded" not in out + err and not (tiny_disk / "runs").exists()


@pytest.mark.parametrize("runs_dir", ["/sys/tokctl-runs", "FILE/runs"])
def test_an_unwritable_runs_folder_is_one_line_before_any_model_loads(tiny_lm_dir, tmp_path,
                                                                      runs_dir):
    (tmp_path / "FILE").write_text("a file, not a folder")
    runs_dir = runs_dir.replace("FILE", str(tmp_path / "FILE"))
    for args in ([], ["-m", "method=ar,hf"]):
        proc = tokctl_process("decode", *args, "model=hf", f"model.path={tiny_lm_dir}",
                              f"runs_dir={runs_dir}")
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and "cannot write run output" in lines[0], err
        assert "loaded" not in out + err


# ---------------------------------------------------------------------------------- sweeps
def sweep_args(tiny_lm_dir, tmp_path, *extra):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"count to {i}"}) + "\n" for i in range(500)))
    return ["decode", "-m", "method=ar,hf", "model=hf", f"model.path={tiny_lm_dir}", "data=jsonl",
            f"data.path={f}", "max_new_tokens=32", "warmup=0", f"hydra.sweep.dir={tmp_path / 's'}",
            *extra]


def test_ctrl_c_stops_a_sweep_at_the_current_point(tiny_lm_dir, tmp_path):
    sweep = tmp_path / "s"
    proc = tokctl_process(*sweep_args(tiny_lm_dir, tmp_path, "threads=1"))
    wait_for(lambda: size(sweep / "0" / "samples.jsonl") > 0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    data = json.loads((sweep / "sweep.json").read_text())
    assert data["state"] == "interrupted"
    assert [p["status"] for p in data["points"]] == ["interrupted", "pending"]
    assert not (sweep / "1").exists()  # the point after the interrupted one never started
    sample_lines(sweep / "0")
    assert "Traceback" not in err


def test_ctrl_c_in_a_terminal_stops_a_parallel_sweep_cleanly(tiny_lm_dir, tmp_path):
    """Ctrl-C reaches the whole process group: tokctl, submitit's controllers, the jobs."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "s"
    proc = tokctl_process(*sweep_args(tiny_lm_dir, tmp_path, "hydra/launcher=submitit_local"),
                          start_new_session=True)
    wait_for(lambda: all(size(sweep / d / "samples.jsonl") > 0 for d in "01"),
             what="both jobs to write samples")
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    data = json.loads((sweep / "sweep.json").read_text())
    assert data["state"] == "interrupted"
    for p in data["points"]:
        run = sweep / p["dir"]
        assert p["status"] == "interrupted"
        assert json.loads((run / "metrics.json").read_text())["partial"] is True
        sample_lines(run)
    assert "Traceback" not in err
