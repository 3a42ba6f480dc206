"""A SLURM sweep end to end, on a fake cluster: `sbatch`, `srun` and `sacct` stand-ins that run
the array's tasks on this machine with the environment SLURM gives them. What is checked is
tokctl's side: the sbatch directives its shipped launcher configs produce, and that its jobs run
and record their SLURM identity when submitit starts them as array tasks."""

import json
import os
import stat
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SBATCH = r'''
import os, re, subprocess, sys
script = sys.argv[-1]
text = open(script).read()
with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
    log.write(text + "\n")
m = re.search(r"#SBATCH --array=0-(\d+)", text)
folder = re.search(r"-m submitit.core._submit (\S+)", text).group(1)
for i in range(int(m.group(1)) + 1 if m else 1):
    env = dict(os.environ, SLURM_JOB_ID=str(5000 + i), SLURM_ARRAY_JOB_ID="4242",
               SLURM_ARRAY_TASK_ID=str(i), SLURM_NTASKS="1", SLURM_JOB_NUM_NODES="1",
               SLURM_NODEID="0", SLURM_PROCID="0", SLURM_LOCALID="0",
               SLURM_JOB_NODELIST="fake-node")
    # submitit moves each task's pickle into place only after sbatch has answered: a real
    # scheduler starts tasks later, so wait for it (starting at once raced, and lost a task).
    pkl = folder.replace("%j", f"4242_{i}") + f"/4242_{i}_submitted.pkl"
    wait = f'for k in $(seq 600); do [ -e "{pkl}" ] && break; sleep 0.1; done; exec bash "{script}"'
    subprocess.Popen(["bash", "-c", wait], env=env, start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print("Submitted batch job 4242")
'''

SRUN = r'''
import os, sys
args, files = sys.argv[1:], {}
while args and args[0].startswith("--"):
    flag = args.pop(0)
    if flag in ("--output", "--error"):
        files[flag] = args.pop(0)
def expand(p):
    e = os.environ
    return (p.replace("%A", e["SLURM_ARRAY_JOB_ID"]).replace("%a", e["SLURM_ARRAY_TASK_ID"])
             .replace("%j", e["SLURM_JOB_ID"]).replace("%t", "0"))
out = open(expand(files["--output"]), "a")
err = open(expand(files["--error"]), "a") if "--error" in files else out
os.dup2(out.fileno(), 1)
os.dup2(err.fileno(), 2)
os.execvp(args[0], args)
'''

SACCT = r'''
import sys
print("JobID|State|NodeList")
for i, a in enumerate(sys.argv):
    if a == "-j":
        print(f"{sys.argv[i + 1]}_[0-99]|RUNNING|fake-node")
'''


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", SBATCH), ("srun", SRUN), ("sacct", SACCT), ("scancel", "")):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "sbatch.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM_LOG": str(log)}
    return env, log


def test_a_sweep_runs_as_a_slurm_job_array(tiny_lm_dir, tmp_path, fake_slurm):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    env, log = fake_slurm
    sweep = tmp_path / "s"
    proc = subprocess.run(
        [sys.executable, "-m", "tokctl.cli", "decode", "-m", "method=ar,hf", "model=hf",
         f"model.path={tiny_lm_dir}", "max_new_tokens=4", "warmup=0", "baseline=null",
         "data.limit=1", "hydra/launcher=slurm_gpu", "hydra.launcher.partition=debug",
         "hydra.launcher.array_parallelism=1", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    script = log.read_text()
    for directive in ("--partition=debug", "--gpus-per-node=1", "--cpus-per-task=8",
                      "--mem=64GB", "--time=240", "--array=0-1%1", "--signal=USR2@120",
                      "--job-name=tokctl-decode"):
        assert f"#SBATCH {directive}" in script, directive
    data = json.loads((sweep / "sweep.json").read_text())
    assert data["launcher"] == "slurm_gpu" and data["counts"] == {"completed": 2}
    tasks = set()
    for p in data["points"]:
        run_env = json.loads((sweep / p["dir"] / "env.json").read_text())["env"]
        assert run_env["SUBMITIT_EXECUTOR"] == "slurm" and run_env["SLURM_ARRAY_JOB_ID"] == "4242"
        tasks.add(run_env["SLURM_ARRAY_TASK_ID"])
    assert tasks == {"0", "1"}
