"""Sweeps (`tokctl <command> -m ...`): the sweep folder, sweep.json, resuming, launchers, locking."""

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokctl.cli import app
from tokctl.errors import UserError
from tokctl.sweep import number_points, parse_request, still_running

runner = CliRunner()


def tiny(tiny_lm_dir, *extra):
    """A decode sweep on the tiny random model: each point takes well under a second."""
    return ["decode", "-m", "model=hf", f"model.path={tiny_lm_dir}", "max_new_tokens=4",
            "warmup=0", "threads=1", "baseline=null", "data.limit=1", *extra]


def tokctl(*args):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def sweep_json(path) -> dict:
    return json.loads((Path(path) / "sweep.json").read_text())


def statuses(path) -> dict[str, str]:
    return {p["dir"]: p["status"] for p in sweep_json(path)["points"]}


# ------------------------------------------------------------------------------- unit pieces
def test_parse_request_splits_resume_and_hydra_overrides():
    req = parse_request(["method=ar,hf", "+resume=true", "hydra/launcher=local",
                         "hydra.sweep.dir=/x", "hydra.launcher.partition=gpu", "seed=1"])
    assert req.task == ["method=ar,hf", "seed=1"]
    assert req.hydra == ["hydra/launcher=local", "hydra.launcher.partition=gpu"]
    assert req.sweep_dir == "/x" and req.resume == "true"
    assert req.spec == ["method=ar,hf", "seed=1"]
    assert parse_request(["resume=runs/decode/a/b"]).resume == "runs/decode/a/b"
    assert parse_request(["+resume=false"]).resume is None
    with pytest.raises(UserError, match="hydra.sweep.dir"):
        parse_request(["hydra.run.dir=/x"])
    with pytest.raises(UserError, match="names the point folders itself"):
        parse_request(["hydra.sweep.subdir=x"])


def test_each_point_keeps_its_folder_number():
    plan = []
    assert number_points(plan, [["method=ar", "seed=1"], ["method=hf", "seed=1"]]) == [0, 1]
    # the same points in any order, and a new point of a grown grid appended
    assert number_points(plan, [["method=xx", "seed=1"], ["seed=1", "method=hf"]]) == [2, 1]
    assert plan == [["method=ar", "seed=1"], ["method=hf", "seed=1"], ["method=xx", "seed=1"]]


def test_a_running_status_is_trusted_only_while_its_process_lives(tmp_path):
    import socket

    run = tmp_path / "r"
    run.mkdir()
    (run / "env.json").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    assert still_running(run)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / "env.json").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    assert not still_running(run)


# --------------------------------------------------------------------- basic launcher, CLI
def test_sweep_folder_points_and_summary(tiny_lm_dir, tmp_path):
    code, out = tokctl(*tiny(tiny_lm_dir, "method=ar,hf", f"runs_dir={tmp_path}"))
    assert code == 0, out
    sweep = Path(out.strip().splitlines()[-1])
    assert sweep.parent.parent == tmp_path / "decode" and sweep.name.endswith("_sweep")
    data = sweep_json(sweep)
    assert data["command"] == "decode" and data["launcher"] == "basic"
    assert data["state"] == "finished" and data["counts"] == {"completed": 2}
    methods = [next(o for o in p["overrides"] if o.startswith("method=")) for p in data["points"]]
    assert methods == ["method=ar", "method=hf"]
    for p, method in zip(data["points"], methods):
        run = sweep / p["dir"]
        assert (run / "status").read_text().strip() == "completed"
        assert f"name: {method.split('=')[1]}-vs-None" in (run / "config.yaml").read_text()
        assert p["metrics"]["tokens_per_s"] > 0
    assert data["invocations"][0]["wall_s"] > 0 and data["invocations"][0]["launched"] == [0, 1]
    assert (sweep / "multirun.yaml").is_file()


def test_a_typo_in_any_point_fails_before_any_folder(tiny_lm_dir, tmp_path):
    code, out = tokctl(*tiny(tiny_lm_dir, "method=ar,nonexistent", f"runs_dir={tmp_path}"))
    assert code == 2 and "Traceback" not in out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "nonexistent" in lines[0]
    assert not any(tmp_path.iterdir())
    code, out = tokctl(*tiny(tiny_lm_dir, "method=ar,hf", "hydra/launcher=nope",
                             f"runs_dir={tmp_path}"))
    assert code == 2 and "available options in 'hydra/launcher'" in out and "slurm_gpu" in out
    assert "search path" not in out and not any(tmp_path.iterdir())


def test_resume_skips_completed_and_reruns_failed_points(tiny_lm_dir, tmp_path):
    good, later = tmp_path / "good.jsonl", tmp_path / "later.jsonl"
    good.write_text('{"prompt": "hello there"}\n')
    args = tiny(tiny_lm_dir, "data=jsonl", f"data.path={good},{later}", f"runs_dir={tmp_path}")
    code, out = tokctl(*args)
    assert code == 1, out  # one point failed: the sweep says so in its exit status
    sweep = Path(out.strip().splitlines()[-1])
    assert statuses(sweep) == {"0": "completed", "1": "failed"}
    assert "does not exist" in (sweep / "1" / "error.txt").read_text()
    first_mtime = (sweep / "0" / "metrics.json").stat().st_mtime_ns

    later.write_text('{"prompt": "and now this one"}\n')
    code, out = tokctl(*args, "+resume=true")
    assert code == 0, out
    assert Path(out.strip().splitlines()[-1]) == sweep  # found by its overrides
    data = sweep_json(sweep)
    assert statuses(sweep) == {"0": "completed", "1": "completed"}
    assert data["invocations"][-1]["launched"] == [1] and data["invocations"][-1]["skipped"] == [0]
    assert (sweep / "0" / "metrics.json").stat().st_mtime_ns == first_mtime  # not rerun
    # the failed attempt is kept out of the way, not deleted, and not counted as a run
    assert data["points"][1]["attempts"] == [".attempts/1-1"]
    assert (sweep / ".attempts" / "1-1" / "status").read_text().strip() == "failed"
    code, out = tokctl("runs", "compare", str(sweep), "--json")
    assert code == 0 and len(json.loads(out)) == 2

    # a grown grid: the new point is appended, the old ones are skipped
    code, out = tokctl(*tiny(tiny_lm_dir, "data=jsonl", f"data.path={good},{later}",
                             "max_new_tokens=4,5", f"runs_dir={tmp_path}"), f"+resume={sweep}")
    assert code == 0, out
    data = sweep_json(sweep)
    assert data["invocations"][-1]["launched"] == [2, 3] and len(data["points"]) == 4


def test_resume_without_an_earlier_sweep_says_so(tiny_lm_dir, tmp_path):
    code, out = tokctl(*tiny(tiny_lm_dir, "method=ar,hf", f"runs_dir={tmp_path}", "+resume=true"))
    assert code == 2 and "no earlier sweep" in out
    code, out = tokctl(*tiny(tiny_lm_dir, "method=ar,hf", f"+resume={tmp_path}"))
    assert code == 2 and "no sweep there" in out


def test_an_explicit_sweep_folder_is_never_reused_silently(tiny_lm_dir, tmp_path):
    where = f"hydra.sweep.dir={tmp_path / 'mine'}"
    assert tokctl(*tiny(tiny_lm_dir, "method=ar", where))[0] == 0
    code, out = tokctl(*tiny(tiny_lm_dir, "method=ar", where))
    assert code == 2 and "already holds a sweep" in out and "+resume=true" in out
    code, out = tokctl(*tiny(tiny_lm_dir, "method=ar", where, "+resume=true"))
    assert code == 0 and sweep_json(tmp_path / "mine")["invocations"][-1]["launched"] == []


def test_a_sweep_folder_in_use_is_refused(tiny_lm_dir, tmp_path):
    folder = tmp_path / "busy"
    folder.mkdir()
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # what a running tokctl holds
        code, out = tokctl(*tiny(tiny_lm_dir, "method=ar", f"hydra.sweep.dir={folder}"))
    assert code == 2 and "another tokctl process" in out


def test_slurm_launcher_without_sbatch_fails_in_one_line(tiny_lm_dir, tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    code, out = tokctl(*tiny(tiny_lm_dir, "method=ar,hf", "hydra/launcher=slurm_gpu",
                             f"runs_dir={tmp_path / 'runs'}"))
    assert code == 2 and "sbatch" in out and "submitit_local" in out
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ real processes, in CI
def run_tokctl(*args, timeout=240, **kw):
    return subprocess.run([sys.executable, "-m", "tokctl.cli", *args], capture_output=True,
                          text=True, timeout=timeout, **kw)


@pytest.mark.slow
def test_submitit_local_runs_points_as_parallel_processes(tiny_lm_dir, tmp_path):
    """The CI check of the submitit launcher: two jobs, each a separate process."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    args = [a for a in tiny(tiny_lm_dir, "method=ar,hf", f"hydra.sweep.dir={tmp_path / 's'}",
                            "hydra/launcher=submitit_local") if a != "threads=1"]
    proc = run_tokctl(*args)
    assert proc.returncode == 0, proc.stderr
    sweep = tmp_path / "s"
    data = sweep_json(sweep)
    assert data["launcher"] == "submitit_local" and data["counts"] == {"completed": 2}
    pids = set()
    for p in data["points"]:
        env = json.loads((sweep / p["dir"] / "env.json").read_text())
        assert env["env"]["SUBMITIT_EXECUTOR"] == "local"
        pids.add(env["pid"])
        # threads=auto split the CPUs between the parallel jobs, and the choice is recorded
        cpus = len(os.sched_getaffinity(0))
        assert env["torch_threads"] == max(1, cpus // 2)
        assert f"threads: {max(1, cpus // 2)}" in (sweep / p["dir"] / "config.yaml").read_text()
    assert len(pids) == 2
    assert any((sweep / ".submitit").iterdir())


@pytest.mark.slow
def test_two_sweeps_started_together_never_share_a_folder(tiny_lm_dir, tmp_path):
    args = [sys.executable, "-m", "tokctl.cli",
            *tiny(tiny_lm_dir, "method=ar,hf", f"runs_dir={tmp_path}")]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    folders = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(folders) == 2
    for folder in folders:
        assert statuses(folder) == {"0": "completed", "1": "completed"}
        pids = {json.loads((Path(folder) / d / "env.json").read_text())["pid"] for d in "01"}
        assert len(pids) == 1  # both points of one sweep ran in that sweep's own process
