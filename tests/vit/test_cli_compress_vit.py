"""End to end through the `tokctl` command on the shipped default model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokctl.vit import default_model

pytestmark = pytest.mark.slow
TOKCTL = [sys.executable, "-m", "tokctl.cli"] if not (Path(sys.executable).parent / "tokctl").exists() \
    else [str(Path(sys.executable).parent / "tokctl")]
QUICK = ["data.limit=32", "batch_size=16", "threads=1", "warmup=1", "fidelity_images=8", "vis.images=2"]


def tokctl(*args, cwd=None):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([*TOKCTL, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture(autouse=True)
def _needs_shipped_weights():
    if not (default_model.WEIGHTS / "config.json").is_file():
        pytest.fail("the default ViT checkpoint is missing from tokctl/vit/weights/fashion-vit")


def test_default_run_writes_metrics_and_figure(tmp_path):
    out = tokctl("compress-vit", *QUICK, f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 0, out.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["method"] == "tome" and m["baseline_top1"] > 0.5 and m["gflops"] < m["baseline_gflops"]
    assert m["tokens_per_layer"][0] == 197
    assert (tmp_path / "run" / "merges.png").is_file()


def test_half_precision_run_records_its_placement(tmp_path):
    out = tokctl("compress-vit", *QUICK, "data.limit=16", "dtype=bfloat16", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 0, out.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (m["device"], m["dtype"]) == ("cpu", "bfloat16")
    # bf16 rounding may flip a few argmaxes, not most of them
    assert m["agreement"] > 0.5 and m["tokens_per_layer"][0] == 197


@pytest.mark.parametrize("args,message", [
    (["method.r=-3"], "method.r=-3: expected an int >= 0"),
    (["compile=true", "method=evit"], "has no fused block to compile"),
    (["data=folder", "data.path=EMPTY"], "holds no images"),
    (["model=hf", "model.path=BERT"], "not a ViT-family encoder"),
    (["dtype=float8"], "dtype=float8 is not one of"),
    (["device=gpu"], "device=gpu is not a torch device"),
    *([(["device=cuda"], "no CUDA device here")] if not torch.cuda.is_available() else []),
])
def test_bad_inputs_are_one_line(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 16}))
    args = [a.replace("EMPTY", str(tmp_path / "empty")).replace("BERT", str(bert)) for a in args]
    out = tokctl("compress-vit", *QUICK, *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in out.stderr


def test_sweep_over_r(tmp_path):
    out = tokctl("compress-vit", "-m", "method=tome", "method.r=0,8", *QUICK, f"hydra.sweep.dir={tmp_path / 's'}")
    assert out.returncode == 0, out.stderr
    metrics = [json.loads((tmp_path / "s" / str(i) / "metrics.json").read_text()) for i in (0, 1)]
    assert metrics[0]["gflops"] > metrics[1]["gflops"]
    assert metrics[0]["agreement"] == 1.0
