"""Byte-level decoding through the CLI: data=cut with the three ways in one run on a tiny model,
the ensemble of two tokenizers, bad input in one line, and one run on the real embedded model."""

import json
import subprocess
import sys

import pytest
from cli_helpers import one_error_line, tokctl
from conftest import build_tiny_lm


def tiny(tiny_lm_dir, tmp_path, *extra):
    return ["decode", "model=hf", f"model.path={tiny_lm_dir}", f"hydra.run.dir={tmp_path / 'run'}",
            "max_new_tokens=6", "warmup=0", "threads=1", *extra]


def test_cut_prompts_three_ways_in_one_run(tiny_lm_dir, tmp_path):
    code, out = tokctl(*tiny(tiny_lm_dir, tmp_path, "data=cut", "data.limit=3", "method=bytes",
                             "baseline=ar", "also=[heal]"))
    assert code == 0, out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["unit"] == "bytes" and metrics["num_samples"] == 3
    for m in (metrics, metrics["also"]["heal"]):
        assert 0 <= m["exact_match"] <= 1 and m["ref_logprob_per_byte"] < 0
        assert m["bytes_per_s"] > 0 and m["calls_per_byte"] > 0
    assert metrics["baseline_ref_logprob_per_byte"] < 0
    assert "per byte" in out and "log-lik/byte" in out
    rows = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert all("mid_token" in r and r["new_bytes"] >= 1 for r in rows)


def test_byte_ensemble_of_two_tokenizers(tiny_lm_dir, tmp_path):
    other = tmp_path / "other"
    build_tiny_lm(other, vocab_words=400, seed=3)
    code, out = tokctl(*tiny(tiny_lm_dir, tmp_path, "method=byte_ensemble", f"draft_model={other}",
                             "method.combine=product", "data.limit=1", "baseline=null"))
    assert code == 0, out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["method_info"]["combine"] == "product" and metrics["new_bytes"] > 0


@pytest.mark.parametrize("override,needle", [
    ("method.combine=average", "combine"),
    ("method.weight=2", "weight"),
    ("method.prune=1", "prune"),
    ("data.cut_inside=middle", "cut_inside"),
])
def test_bad_options_fail_in_one_line(tiny_lm_dir, tmp_path, override, needle):
    method = "method=byte_ensemble" if "combine" in override or "weight" in override \
        else "method=bytes"
    code, out = tokctl(*tiny(tiny_lm_dir, tmp_path, "data=cut", method, override))
    assert code == 2 and needle in one_error_line(out)


def test_ensemble_needs_a_second_model(tiny_lm_dir, tmp_path):
    code, out = tokctl(*tiny(tiny_lm_dir, tmp_path, "method=byte_ensemble"))
    assert code == 2 and "draft_model" in one_error_line(out)


def test_invalid_utf8_and_short_prompts_fail_in_one_line(tiny_lm_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "caf\xe9 au lait"}\n')
    code, out = tokctl(*tiny(tiny_lm_dir, tmp_path, "data=cut", f"data.path={bad}",
                             "method=bytes"))
    assert code == 2 and "bad.jsonl" in one_error_line(out)
    short = tmp_path / "short.jsonl"
    short.write_text('{"prompt": "too short to cut"}\n')
    code, out = tokctl(*tiny(tiny_lm_dir, tmp_path / "2", "data=cut", f"data.path={short}",
                             "method=bytes"))
    assert code == 2 and "long enough" in one_error_line(out)


@pytest.mark.slow
def test_cut_prompts_on_the_embedded_model(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "tokctl.cli", "decode", f"hydra.run.dir={run}",
                           "data=cut", "data.limit=2", "max_new_tokens=6", "warmup=0",
                           "method=bytes", "baseline=ar", "also=[heal]", "threads=1"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    env = json.loads((run / "env.json").read_text())
    assert env["model_source"].startswith("embedded:smollm2-135m")
    assert metrics["num_samples"] == 2 and metrics["new_bytes"] > 0
    assert 0 < metrics["calls_per_byte"] <= 1.5  # at most about one model call per byte
    for m in (metrics, metrics["also"]["heal"]):
        assert m["ref_logprob_per_byte"] < 0
