"""S2D's nested exits: greedy exactness against `ar`, the choice of exit by its threshold, the
target's distribution at temperature > 0, and bad input in one line (exits not increasing,
thresholds outside [0, 1], an adapter of another model or of another exit)."""

import json

import pytest
import torch
from cli_helpers import one_error_line, tokctl
from test_kangaroo import greedy, load, prompts

from conftest import build_tiny_lm
from tokctl.decode import kangaroo as kg
from tokctl.decode.methods.ar import Autoregressive
from tokctl.decode.methods.s2d import S2D
from tokctl.decode.target import make_target
from tokctl.errors import UserError


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load(build_tiny_lm(tmp_path_factory.mktemp("s2d_lm"), layers=3))


@pytest.fixture(scope="module")
def adapters(lm, tmp_path_factory):
    """Adapters at exit layers 1 and 2, perturbed away from their start copies."""
    folder = tmp_path_factory.mktemp("s2d_adapters")
    g = torch.Generator().manual_seed(4)
    paths = []
    for layer in (1, 2):
        a = kg.KangarooAdapter.for_model(lm.model, layer)
        with torch.no_grad():
            for p in a.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        paths.append(folder / f"L{layer}.safetensors")
        kg.save_adapter(a, paths[-1], kg.model_fingerprint(lm.model))
    return [str(p) for p in paths]


@pytest.mark.parametrize("thresholds", [[0.5, 0.3], [0.0, 0.0], [1.0, 1.0]])
def test_greedy_is_identical_to_ar(lm, adapters, thresholds):
    target = make_target(lm.model, lm.tokenizer)
    ar = Autoregressive()
    ar.setup(target, lm)
    m = S2D(exit_layers=[1, 2], adapters=adapters, thresholds=thresholds, max_tokens=4)
    m.setup(target, lm)
    for p in prompts(len(lm.tokenizer))[:2]:
        assert m.generate(p, greedy(20), None).tokens == ar.generate(p, greedy(20), None).tokens
    info = m.run_info()
    assert info["exit_layers"] == [1, 2] and abs(sum(info["exit_use"]) - 1) < 1e-3
    if thresholds == [0.0, 0.0]:  # the shallow exit is always sure enough
        assert info["exit_use"] == [1.0, 0.0] and info["forwards_per_step_by_exit"][1] == 0
    if thresholds == [1.0, 1.0]:  # never sure: the deep exit drafts one token and stops
        assert info["exit_use"] == [0.0, 1.0] and info["mean_draft_tokens"] == 1.0


def test_a_plain_exit_mixes_with_an_adapter(lm, adapters):
    target = make_target(lm.model, lm.tokenizer)
    ar = Autoregressive()
    ar.setup(target, lm)
    m = S2D(exit_layers=[1, 2], adapters=["none", adapters[1]], thresholds=[0.3, 0.2])
    m.setup(target, lm)
    p = prompts(len(lm.tokenizer))[2]
    assert m.generate(p, greedy(16), None).tokens == ar.generate(p, greedy(16), None).tokens
    assert m.run_info()["exits"][0]["adapter"] is None


def test_sampling_keeps_the_target_distribution(lm, adapters):
    """The second new token's law against the exact marginal, with both exits in use (the tiny
    model's top-3 distributions have top probabilities about 0.33-0.39: 0.345 splits them)."""
    from test_draft_methods import second_token_p_value

    target = make_target(lm.model, lm.tokenizer)
    m = S2D(exit_layers=[1, 2], adapters=adapters, thresholds=[0.345, 0.0], max_tokens=2)
    m.setup(target, lm)
    assert second_token_p_value(m, target, draws=200) > 1e-4
    assert min(m._use) > 0, m._use  # both exits proposed tokens


def test_bad_input_is_refused(lm, adapters, tmp_path):
    target = make_target(lm.model, lm.tokenizer)
    with pytest.raises(UserError, match="must increase in depth"):
        S2D(exit_layers=[2, 1], thresholds=[0.5, 0.5])
    with pytest.raises(UserError, match="not a probability"):
        S2D(exit_layers=[1, 2], thresholds=[0.5, 1.5])
    with pytest.raises(UserError, match="one per exit"):
        S2D(exit_layers=[1, 2], thresholds=[0.5])
    with pytest.raises(UserError, match="exit_layers=3: choose it from 1 to 2"):
        S2D(exit_layers=[1, 3], adapters="none", thresholds=[0.5, 0.5]).setup(target, lm)
    with pytest.raises(UserError, match="trained at exit layer 2"):
        S2D(exit_layers=[1, 3], adapters=adapters, thresholds=[0.5, 0.5]).setup(target, lm)
    other = load(build_tiny_lm(tmp_path / "other", layers=3, seed=7))
    with pytest.raises(UserError, match="trained on another model"):
        S2D(exit_layers=[1, 2], adapters=adapters,
            thresholds=[0.5, 0.5]).setup(make_target(other.model, other.tokenizer), other)


def test_cli(tiny_lm_dir, tmp_path):
    base = ["decode", "model=hf", f"model.path={tiny_lm_dir}", "max_new_tokens=8", "warmup=0",
            "threads=1", "data.limit=1", "method=s2d"]
    code, out = tokctl(*base, "method.exit_layers=[1]", "method.adapters=none",
                       "method.thresholds=[0.3]", "baseline=ar", f"hydra.run.dir={tmp_path / 'a'}")
    assert code == 0, out
    d = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert d["identical_to_baseline"] == 1.0 and d["method_info"]["exit_layers"] == [1]
    code, out = tokctl(*base, "method.exit_layers=[2,1]", f"hydra.run.dir={tmp_path / 'b'}")
    assert code != 0 and "must increase" in one_error_line(out)
