"""Sparse decoding and the long-context prompt sets through the CLI: a tiny run, bad input in one
line, and one small run on the real embedded model."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tokctl.cli import app

runner = CliRunner()


def tokctl(tiny_lm_dir, tmp_path, *extra):
    result = runner.invoke(app, ["decode", "model=hf", f"model.path={tiny_lm_dir}",
                                 f"hydra.run.dir={tmp_path / 'run'}", "max_new_tokens=6",
                                 "warmup=0", "threads=1", *extra])
    return result.exit_code, result.output


def error_line(output):
    """The error, one line, last (after the status lines of what did run); no traceback."""
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and "Traceback" not in output, output
    assert sum(ln.startswith("error:") for ln in lines) == 1, output
    return lines[-1]


SPARSE_ON_TWO_LAYERS = ("method=tidal", "method.selection_layer=0", "method.reselection_layer=1",
                        "method.top_k=16", "also=[{method:recycled_attention,top_k:16,stride:3}]",
                        "baseline=ar")


def test_passkey_run_writes_the_long_context_figures(tiny_lm_dir, tmp_path):
    code, out = tokctl(tiny_lm_dir, tmp_path, *SPARSE_ON_TWO_LAYERS, "data=passkey",
                       "data.context_tokens=400", "data.limit=2")
    assert code == 0, out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for m in (metrics, metrics["also"]["recycled_attention(top_k=16,stride=3)"]):
        for key in ("decode_tokens_per_s", "decode_speedup", "prefill_s", "accuracy",
                    "agreement", "agreement_prefix", "perplexity", "cache_read"):
            assert m[key] is not None, key
        assert len(m["cache_read_per_layer"]) == 2
    assert metrics["cache_read"] == 1.0  # two layers: both select, none is left to read sparsely
    assert metrics["also"]["recycled_attention(top_k=16,stride=3)"]["cache_read"] < 1
    assert metrics["baseline_accuracy"] is not None and metrics["baseline_perplexity"] > 0
    assert metrics["method_info"] == {"top_k": 16, "selection_layer": 0, "reselection_layer": 1}


@pytest.mark.parametrize("extra,needle", [
    (("method=tidal", "data=passkey", "data.context_tokens=600"), "model's context of 512"),
    (("method=tidal", "data=passkey", "data.context_tokens=400", "method.selection_layer=5"),
     "selection_layer=5"),
    (("method=recycled_attention", "data=passkey", "data.context_tokens=350", "method.top_k=400"),
     "top_k=400"),
    (("method=tidal", "method.top_k=0"), "top_k"),
    (("method=recycled_attention", "method.stride=0"), "stride"),
    (("method=ar", "data=passkey", "data.depth=2"), "depth"),
    (("method=ar", "data=long"), "data.path"),
    (("method=ar", "data=passkey", "data.context_tokens=100"), "context_tokens=100"),
])
def test_bad_input_fails_in_one_line(tiny_lm_dir, tmp_path, extra, needle):
    code, out = tokctl(tiny_lm_dir, tmp_path, "baseline=null", *extra)
    assert code != 0
    assert needle in error_line(out)


@pytest.mark.slow
def test_sparse_methods_on_the_embedded_model(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "tokctl.cli", "decode", f"hydra.run.dir={run}",
                           "method=tidal", "also=[recycled_attention]", "baseline=ar",
                           "data=passkey", "data.context_tokens=400", "data.limit=1",
                           "method.top_k=64", "max_new_tokens=8", "warmup=0", "threads=1"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method_info"]["reselection_layer"] == 12  # 13/32 of SmolLM2's 30 layers
    assert metrics["cache_read_per_layer"][:3] == [1.0, 1.0, 1.0]
    assert metrics["cache_read_per_layer"][3] < 0.2
    assert 0 < metrics["also"]["recycled_attention"]["cache_read"] < 1
    assert metrics["kernel"] == "reference"
