"""End to end through the CLI on the real embedded SmolLM2-135M (converted once into the cache)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def run_decode(tmp_path, *overrides):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "tokctl.cli", "decode", f"hydra.run.dir={run}",
                           "data.limit=2", "max_new_tokens=16", "warmup=0", *overrides],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str(run)
    return json.loads((run / "metrics.json").read_text()), run


def test_ar_against_hf_generate(tmp_path):
    metrics, run = run_decode(tmp_path, "method=ar", "baseline=hf")
    assert metrics["identical_to_baseline"] == 1.0
    assert metrics["num_samples"] == 2 and metrics["new_tokens"] > 0
    env = json.loads((run / "env.json").read_text())
    assert env["model_source"].startswith("embedded:smollm2-135m")
    assert env["backend"] == "fast"


def test_speculative_methods_are_exact_in_fp32(tmp_path):
    metrics, run = run_decode(tmp_path, "method=hybrid", "also=[recycling,lookup]", "baseline=ar")
    for m in [metrics, *metrics["also"].values()]:
        assert m["identical_to_baseline"] == 1.0
        assert m["mean_accepted_tokens"] >= 1.0
    assert (run / "decode_speedup.png").is_file() and (run / "decode_accepted.png").is_file()


def test_self_speculation_with_the_shipped_adapters(tmp_path):
    """A fresh clone decodes with the adapters shipped in the package (adapter=auto): Kangaroo at
    exit 4 and S2D's nested exits, both identical to ar in fp32."""
    metrics, _ = run_decode(tmp_path, "method=kangaroo", "also=[s2d]", "baseline=ar")
    assert metrics["identical_to_baseline"] == 1.0
    assert metrics["also"]["s2d"]["identical_to_baseline"] == 1.0
    info = metrics["method_info"]
    assert info["adapter"].endswith("tokctl/decode/adapters/smollm2-135m-kangaroo.safetensors")
    assert info["exit_layer"] == 4
