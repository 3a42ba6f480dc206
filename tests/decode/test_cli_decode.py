"""`tokctl decode` through the CLI: help, every kind of bad input, a full run on a tiny model."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from cli_helpers import one_error_line, tokctl


def tiny(tiny_lm_dir, tmp_path, *extra):
    return ["decode", "model=hf", f"model.path={tiny_lm_dir}", f"hydra.run.dir={tmp_path / 'run'}",
            "max_new_tokens=8", "warmup=0", "threads=1", *extra]


def test_help_lists_groups_and_options():
    code, out = tokctl("decode", "--help")
    assert code == 0
    assert "method:" in out and "ar" in out and "hf" in out
    assert "model:" in out and "smollm2-135m" in out
    assert "max_new_tokens=128" in out


@pytest.mark.parametrize("override,needle", [
    ("method=nonexistent", "method"),
    ("nogroup=x", "nogroup"),
    ("no_such_key=1", "no_such_key"),
    ("max_new_tokens=0", "max_new_tokens"),
    ("temperature=-1", "temperature"),
    ("baseline=nope", "baseline"),
    ("model.dtype=int3", "dtype"),
    ("--weird-flag", "--weird-flag"),
])
def test_bad_overrides_fail_in_one_line(tiny_lm_dir, tmp_path, override, needle):
    code, out = tokctl(*tiny(tiny_lm_dir, tmp_path, override))
    assert code == 2
    assert needle in one_error_line(out)


def test_prepacked_weights_cannot_be_compiled(tiny_lm_dir, tmp_path):
    code, out = tokctl(*tiny(tiny_lm_dir, tmp_path, "compile=true", "model.prepack=true"))
    assert code == 2
    assert "model.prepack" in one_error_line(out)


def test_missing_model_fails_in_one_line(tmp_path):
    code, out = tokctl("decode", "model=hf", f"model.path={tmp_path / 'nothing'}",
                       f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2
    assert "model.path" in one_error_line(out)


def test_unreachable_hub_model_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    code, out = tokctl("decode", "model=hf", "model.id=nobody/no-such-model-xyz",
                       f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2
    line = one_error_line(out)
    assert "model.path" in line and "no-such-model-xyz" in line
    assert time.time() - start < 60  # no waiting on retries (a generous bound, not a benchmark)


@pytest.mark.parametrize("content,needle", [
    ('{"prompt": "hi"}\n{not json}\n', ":2: not valid JSON"),
    ('{"prompt": "   "}\n', "empty prompt"),
    ('{"question": "x"}\n', "needs 'turns'"),
    ("", "holds no prompts"),
])
def test_bad_data_files_fail_in_one_line(tiny_lm_dir, tmp_path, content, needle):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    code, out = tokctl(*tiny(tiny_lm_dir, tmp_path, "data=jsonl", f"data.path={f}"))
    assert code == 2
    assert needle in one_error_line(out)


def test_missing_data_file(tiny_lm_dir, tmp_path):
    code, out = tokctl(*tiny(tiny_lm_dir, tmp_path, "data=jsonl", f"data.path={tmp_path}/none.jsonl"))
    assert code == 2
    assert "does not exist" in one_error_line(out)


def test_run_on_tiny_model_writes_the_run_folder(tiny_lm_dir, tmp_path):
    code, out = tokctl(*tiny(tiny_lm_dir, tmp_path, "data.limit=3", "method=ar", "baseline=hf"))
    assert code == 0, out
    run = tmp_path / "run"
    assert out.strip().splitlines()[-1] == str(run)
    assert (run / "status").read_text().strip() == "completed"
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("tokens_per_s", "baseline_tokens_per_s", "speedup", "speedup_median",
                "speedup_q25", "speedup_q75", "mean_accepted_tokens", "identical_to_baseline",
                "new_tokens", "num_samples", "per_category", "kernel"):
        assert key in metrics
    assert metrics["num_samples"] == 3
    assert metrics["identical_to_baseline"] == 1.0
    assert metrics["mean_accepted_tokens"] == 1.0
    rows = [json.loads(l) for l in (run / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["identical_to_baseline"] for r in rows)
    assert all(len(r["token_ids"][0]) == r["new_tokens"] for r in rows)
    env = json.loads((run / "env.json").read_text())
    assert env["torch_threads"] == 1 and "torch" in env["packages"]
    assert "max_new_tokens: 8" in (run / "config.yaml").read_text()


def test_existing_run_folder_is_refused(tiny_lm_dir, tmp_path):
    assert tokctl(*tiny(tiny_lm_dir, tmp_path, "data.limit=1", "baseline=null"))[0] == 0
    code, out = tokctl(*tiny(tiny_lm_dir, tmp_path, "data.limit=1", "baseline=null"))
    assert code == 2 and "already holds a run" in one_error_line(out)


def test_multi_turn_and_categories(tiny_lm_dir, tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text("\n".join(json.dumps(q) for q in [
        {"question_id": 1, "category": "writing", "turns": ["write a poem", "shorter please"]},
        {"question_id": 2, "category": "math", "turns": ["what is 2+2", "and 3+3"]},
    ]) + "\n")
    code, out = tokctl(*tiny(tiny_lm_dir, tmp_path, "data=jsonl", f"data.path={f}",
                             "data.multi_turn=true", "data.categories=[math]", "baseline=null"))
    assert code == 0, out
    rows = [json.loads(l) for l in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [r["category"] for r in rows] == ["math"]
    assert len(rows[0]["text"]) == 2 and rows[0]["prompt_tokens"][1] > rows[0]["prompt_tokens"][0]


def test_too_long_prompt_fails_that_sample_only(tiny_lm_dir, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "the quick brown fox " * 400}) + "\n"
                 + json.dumps({"prompt": "hello"}) + "\n")
    code, out = tokctl(*tiny(tiny_lm_dir, tmp_path, "data=jsonl", f"data.path={f}"))
    assert code == 0, out
    run = tmp_path / "run"
    rows = [json.loads(l) for l in (run / "samples.jsonl").read_text().splitlines()]
    assert "context" in rows[0]["error"] and "error" not in rows[1]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["failed_samples"] == 1 and metrics["num_samples"] == 1


def test_ctrl_c_keeps_finished_samples(tiny_lm_dir, tmp_path):
    """A real process, a real SIGINT: status interrupted, every finished line intact."""
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"count to {i}"}) + "\n" for i in range(500)))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "tokctl.cli", *tiny(tiny_lm_dir, tmp_path, "data=jsonl",
                                                       f"data.path={f}", "max_new_tokens=32")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "TOKCTL_DEBUG": ""})
    deadline = time.time() + 120
    while time.time() < deadline:
        samples = run / "samples.jsonl"
        if samples.exists() and len(samples.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert (run / "status").read_text().strip() == "interrupted"
    lines = (run / "samples.jsonl").read_text().splitlines()
    assert len(lines) >= 2 and all(json.loads(l)["id"] is not None for l in lines)
    assert b"Traceback" not in err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["partial"] is True and metrics["num_samples"] == len(lines)


def test_draft_model_by_folder(tiny_lm_dir, tmp_path):
    code, out = tokctl(*tiny(tiny_lm_dir, tmp_path, "method=draft", f"draft_model={tiny_lm_dir}",
                             "baseline=ar", "data.limit=2", "method.budget=3"))
    assert code == 0, out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["identical_to_baseline"] == 1.0
    assert metrics["mean_accepted_tokens"] > 2.0  # the target drafting for itself
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["draft_model_source"].startswith("path:")


def test_method_needing_a_draft_model_fails_in_one_line(tiny_lm_dir, tmp_path):
    code, out = tokctl(*tiny(tiny_lm_dir, tmp_path, "method=rsd"))
    assert code == 2 and "draft_model=" in one_error_line(out)


def test_also_runs_several_methods_on_the_same_samples(tiny_lm_dir, tmp_path):
    code, out = tokctl(*tiny(tiny_lm_dir, tmp_path, "method=recycling", "also=[lookup,hybrid]",
                             "baseline=ar", "data.limit=2", "method.budget=4"))
    assert code == 0, out
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["also"]) == {"lookup", "hybrid"}
    for m in [metrics, *metrics["also"].values()]:
        assert m["identical_to_baseline"] == 1.0 and m["num_samples"] == 2
    row = json.loads((run / "samples.jsonl").read_text().splitlines()[0])
    assert set(row["also"]) == {"lookup", "hybrid"}
    assert (run / "decode_speedup.png").is_file()


def test_also_needs_a_baseline(tiny_lm_dir, tmp_path):
    code, out = tokctl(*tiny(tiny_lm_dir, tmp_path, "also=[lookup]", "baseline=null"))
    assert code == 2 and "baseline" in one_error_line(out)


def test_early_exit_self_draft(tiny_lm_dir, tmp_path):
    code, out = tokctl(*tiny(tiny_lm_dir, tmp_path, "method=dyspec", "draft_model=self:1",
                             "baseline=ar", "data.limit=2", "method.budget=4"))
    assert code == 0, out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["identical_to_baseline"] == 1.0
    assert "first 1 layers" in metrics["method_info"]["draft_model"]


def test_early_exit_layer_out_of_range(tiny_lm_dir, tmp_path):
    code, out = tokctl(*tiny(tiny_lm_dir, tmp_path, "method=draft", "draft_model=self:7"))
    # Known only once the model is loaded: the error is the last line, after the load notice.
    assert code == 2 and "Traceback" not in out
    assert out.strip().splitlines()[-1].startswith("error: draft_model=self:7")


def test_also_takes_variants_of_one_method(tiny_lm_dir, tmp_path):
    code, out = tokctl(*tiny(tiny_lm_dir, tmp_path, "method=recycling", "method.budget=2",
                             "also=[{method:recycling,budget:6,label:big},{method:lookup,max_tokens:3}]",
                             "baseline=ar", "data.limit=1"))
    assert code == 0, out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["also"]) == {"big", "lookup(max_tokens=3)"}
    assert metrics["also"]["big"]["method_info"]["budget"] == 6
