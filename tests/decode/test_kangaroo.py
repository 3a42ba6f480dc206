"""Kangaroo: the adapter's lean step against its training forward, greedy exactness against `ar`,
the target's distribution at temperature > 0, the confidence stop, and every bad input in one
line (an exit layer outside the model, a missing or mismatched adapter, a threshold outside [0, 1])."""

import pytest
import torch
from cli_helpers import one_error_line, tokctl
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import build_tiny_lm
from tokctl.decode import kangaroo as kg
from tokctl.decode.methods.ar import Autoregressive
from tokctl.decode.methods.kangaroo import Kangaroo
from tokctl.decode.sampling import Sampling, Settings
from tokctl.decode.target import FastTarget, make_target
from tokctl.errors import UserError
from tokctl.models.loading import LoadedModel


def load(folder):
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return LoadedModel(model=model, tokenizer=tok, source=f"test:{folder}", load_s=0.0)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load(build_tiny_lm(tmp_path_factory.mktemp("kg_lm"), layers=3))


@pytest.fixture(scope="module")
def adapter_file(lm, tmp_path_factory):
    """An adapter at exit layer 1 with perturbed weights (not the start copy of layer 1)."""
    a = kg.KangarooAdapter.for_model(lm.model, 1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp("kg_adapter") / "adapter.safetensors"
    kg.save_adapter(a, path, kg.model_fingerprint(lm.model), {"note": "test"})
    return path


def greedy(n=30):
    return Settings(max_new_tokens=n, sampling=Sampling(), eos_ids=frozenset())


def prompts(vocab):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(10, vocab, (9 + i,), generator=g).tolist() for i in range(3)]


def test_the_lean_adapter_step_matches_the_training_forward(lm, adapter_file):
    """Prefill and one-token steps of the draft (first layer + adapter + head) give the logits of
    the training path (HF's hidden states after layer 1, the adapter's batched forward, the head)."""
    adapter, _ = kg.load_adapter(adapter_file, lm.model)
    draft = FastTarget(lm.model, lm.tokenizer, exit_layer=1, adapter=adapter)
    ids = prompts(len(lm.tokenizer))[0]
    with torch.no_grad():
        h = lm.model.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1]
        cos, sin = lm.model.model.rotary_emb(h, torch.arange(len(ids))[None])
        want = adapter.train_forward(h, cos[0], sin[0])[0] @ lm.model.lm_head.weight.T
    got = [draft.prefill(ids[:5])]
    for t in ids[5:]:
        got.append(draft.forward([t])[0])
        draft.commit([0])
    assert torch.allclose(torch.stack(got), want[4:], atol=1e-4)


@pytest.mark.parametrize("options", [{}, {"threshold": 0.0, "max_tokens": 3},
                                     {"adapter": "none", "exit_layer": 2}])
def test_greedy_is_identical_to_ar(lm, adapter_file, options):
    target = make_target(lm.model, lm.tokenizer)
    ar = Autoregressive()
    ar.setup(target, lm)
    m = Kangaroo(**{"adapter": str(adapter_file), **options})
    m.setup(target, lm)
    for p in prompts(len(lm.tokenizer))[:2]:
        assert m.generate(p, greedy(20), None).tokens == ar.generate(p, greedy(20), None).tokens
    info = m.run_info()
    assert info["steps"] > 0 and 1 <= info["mean_draft_tokens"] <= m.max_tokens


def test_the_confidence_threshold_stops_drafting(lm, adapter_file):
    """threshold=1 stops after every first token (no draft is that sure); threshold=0 never."""
    target = make_target(lm.model, lm.tokenizer)
    sure, unsure = Kangaroo(str(adapter_file), threshold=0.0, max_tokens=4), \
        Kangaroo(str(adapter_file), threshold=1.0, max_tokens=4)
    for m in (sure, unsure):
        m.setup(target, lm)
        m.generate(prompts(len(lm.tokenizer))[1], greedy(20), None)
    assert set(unsure._drafted) == {1}
    assert max(sure._drafted) == 4 and unsure.run_info()["stopped_by_threshold"] > 0.9


def test_sampling_keeps_the_target_distribution(lm, adapter_file):
    """The second new token's law (the first a verifier decides) against the exact marginal."""
    from test_draft_methods import second_token_p_value

    target = make_target(lm.model, lm.tokenizer)
    m = Kangaroo(str(adapter_file), threshold=0.0, max_tokens=2)
    m.setup(target, lm)
    assert second_token_p_value(m, target) > 1e-4


def test_bad_input_is_refused(lm, adapter_file, tmp_path):
    target = make_target(lm.model, lm.tokenizer)
    for bad in (-0.1, 1.5):
        with pytest.raises(UserError, match="threshold"):
            Kangaroo(str(adapter_file), threshold=bad)
    with pytest.raises(UserError, match="no such file"):
        Kangaroo(str(tmp_path / "missing.safetensors")).setup(target, lm)
    with pytest.raises(UserError, match="exit_layer=3: choose it from 1 to 2"):
        Kangaroo("none", exit_layer=3).setup(target, lm)
    with pytest.raises(UserError, match="exit_layer=3: choose it from 1 to 2"):
        kg.KangarooAdapter.for_model(lm.model, 3)
    other = load(build_tiny_lm(tmp_path / "other", layers=3, seed=7))
    with pytest.raises(UserError, match="trained on another model"):
        Kangaroo(str(adapter_file)).setup(make_target(other.model, other.tokenizer), other)


def test_fingerprint_ignores_the_dtype(lm):
    bf16 = load(lm.model.name_or_path)
    bf16.model.to(torch.bfloat16)
    assert kg.model_fingerprint(bf16.model) == kg.model_fingerprint(lm.model)


def _cli(lm_dir, tmp_path, *extra):
    return ["decode", "model=hf", f"model.path={lm_dir}", f"hydra.run.dir={tmp_path / 'run'}",
            "max_new_tokens=8", "warmup=0", "threads=1", "data.limit=1", *extra]


def test_train_adapter_then_decode_through_the_cli(tiny_lm_dir, tmp_path):
    """train-adapter on the tiny model (its own answers), a resumed run, then method=kangaroo
    with that adapter: identical to ar; the shipped adapter (another model) refused in one line."""
    run = tmp_path / "train"
    args = ["decode", "train-adapter", "model=hf", f"model.path={tiny_lm_dir}", "exit_layer=1",
            "seeds=[hello there,the quick fox]", "samples_per_seed=2", "max_new_tokens=10",
            "log_every=2", "eval_every=2", "checkpoint_every=2"]
    code, out = tokctl(*args, "steps=2", f"hydra.run.dir={run}")
    assert code == 0, out
    code, out = tokctl(*args, "steps=4", f"resume={run}", f"hydra.run.dir={tmp_path / 'more'}")
    assert code == 0, out
    assert "resumed from" in out
    import json

    m = json.loads((tmp_path / "more" / "metrics.json").read_text())
    assert m["steps"] == 4 and 0 <= m["val_top1"] <= 1
    # The same corpus again (as for another exit layer): no generation, the first run's ids.
    code, out = tokctl("decode", "train-adapter", "model=hf", f"model.path={tiny_lm_dir}",
                       "exit_layer=1", "steps=1", f"corpus_from={run}",
                       f"hydra.run.dir={tmp_path / 'deeper'}")
    assert code == 0, out
    deeper = json.loads((tmp_path / "deeper" / "metrics.json").read_text())
    assert deeper["steps"] == 1 and deeper["tokens"] == m["tokens"]
    assert deeper["corpus"] == f"from {run}"
    code, out = tokctl(*_cli(tiny_lm_dir, tmp_path, "method=kangaroo",
                             f"method.adapter={tmp_path / 'more'}", "baseline=ar"))
    assert code == 0, out
    d = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert d["identical_to_baseline"] == 1.0
    code, out = tokctl(*_cli(tiny_lm_dir, tmp_path / "x", "method=kangaroo", "baseline=ar"))
    # After the model's one "loaded" line, the refusal is one line (the shipped adapter: missing,
    # or trained on another model).
    last = out.strip().splitlines()[-1]
    assert code != 0 and last.startswith("error:") and "method.adapter=" in last
    assert "Traceback" not in out
    code, out = tokctl(*_cli(tiny_lm_dir, tmp_path / "y", "method=kangaroo",
                             "method.threshold=1.5"))
    assert code != 0 and "threshold" in one_error_line(out)
    code, out = tokctl("decode", "train-adapter", "model=hf", f"model.path={tiny_lm_dir}",
                       "exit_layer=9", f"hydra.run.dir={tmp_path / 'z'}")
    assert code != 0 and "exit_layer=9" in one_error_line(out)
