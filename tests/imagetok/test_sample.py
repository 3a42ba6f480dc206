"""`tokctl tokenize-image sample`: token files and a grid from the prior (batched and through the
decoding engine, LANTERN included), and its bad inputs in one line each."""

import json

from PIL import Image
from typer.testing import CliRunner

from tokctl.cli import app
from tokctl.imagetok import prior as prior_mod
from tokctl.imagetok import tokfile


def _sample(tmp_path, tok, prior, *extra):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["tokenize-image", "sample", f"tokenizer_path={tok.path}",
                                   f"prior_path={prior.path}", "threads=1",
                                   f"hydra.run.dir={out}", *extra])
    return res, out


def test_sample_writes_token_files_and_a_grid(tiny_prior, tmp_path):
    tok, prior = tiny_prior
    res, out = _sample(tmp_path, tok, prior, "images=5", "batch=2", "top_k=20")
    assert res.exit_code == 0, res.output
    files = sorted((out / "tokens").glob("*.tok"))
    assert len(files) == 5
    tf = tokfile.loads(files[0].read_bytes(), tok.model.codebook_size, tok.hash, 32)
    assert tf.tokens.shape == (1, 6) and tf.prior_hash is None and (tf.width, tf.height) == (32, 32)
    assert Image.open(out / "grid.png").size == (3 * 32, 2 * 32)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 5 and metrics["batched"] and metrics["tokens_per_image"] == 6


def test_sample_through_the_engine_with_lantern(tiny_prior, tmp_path):
    tok, prior = tiny_prior
    res, out = _sample(tmp_path, tok, prior, "images=3", "batch=1", "method=lantern",
                       "method.k=3", "method.delta=0.2", "method.base_args={budget:4}")
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "lantern" and not metrics["batched"]
    assert metrics["method_info"]["base"] == "recycling"
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["mean_accepted"] >= 1 for r in rows)
    assert len(list((out / "tokens").glob("*.tok"))) == 3


def test_sample_with_a_draft_prior(tiny_prior, tmp_path):
    """method=draft: a (here the same tiny) prior drafts chains that the prior verifies."""
    tok, prior = tiny_prior
    res, out = _sample(tmp_path, tok, prior, "images=2", "batch=1", "method=draft",
                       "method.budget=3", f"draft_prior_path={prior.path}")
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "draft" and metrics["mean_accepted_per_step"] > 1
    assert metrics["method_info"]["draft_model"].startswith("tokctl-prior:")


def test_bad_input_one_line(tiny_prior, tmp_path):
    tok, prior = tiny_prior
    shipped = prior_mod.shipped_priors()[0]  # the default tokenizer's, not the tiny one's
    cases = [([f"prior_path={shipped}"], "another tokenizer"),
             (["method=lantern", "method.delta=1.5", "batch=1"], "delta"),
             (["method=lantern", "method.k=64", "batch=1"], "at most 63 neighbours"),
             (["method=draft", f"draft_prior_path={shipped}"], "another tokenizer"),
             (["method=draft"], "no shipped draft prior")]
    for extra, message in cases:
        res = CliRunner().invoke(app, ["tokenize-image", "sample", f"tokenizer_path={tok.path}",
                                       f"prior_path={prior.path}", "threads=1", "images=1",
                                       f"runs_dir={tmp_path}", *extra])
        assert res.exit_code != 0 and message in res.output, res.output
        assert "Traceback" not in res.output
