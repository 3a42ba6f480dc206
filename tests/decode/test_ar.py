"""method=ar: greedy equals HF generate; sampling follows the shared sampling rules."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from tokctl.decode.methods.ar import Autoregressive
from tokctl.decode.methods.hf import HFGenerate
from tokctl.decode.sampling import Sampling, Settings, probs
from tokctl.decode.target import make_target
from tokctl.models.loading import LoadedModel


@pytest.fixture(scope="module")
def loaded(tiny_lm_dir):
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    return LoadedModel(model=model, tokenizer=tok, source="test", load_s=0.0)


def settings(n=24, **kw):
    return Settings(max_new_tokens=n, sampling=Sampling(**kw), eos_ids=frozenset())


@pytest.mark.parametrize("backend", ["fast", "hf"])
def test_greedy_ar_equals_hf_generate(loaded, backend):
    target = make_target(loaded.model, loaded.tokenizer, backend)
    ar, hf = Autoregressive(), HFGenerate()
    ar.setup(target, loaded)
    hf.setup(target, loaded)
    for seed in range(3):
        prompt = torch.randint(0, len(loaded.tokenizer), (7 + seed,),
                               generator=torch.Generator().manual_seed(seed)).tolist()
        a = ar.generate(prompt, settings(), None)
        b = hf.generate(prompt, settings(), None)
        assert a.tokens == b.tokens
        assert len(a.tokens) == 24 and a.finish_reason == "length"
        assert a.steps == 24  # one forward per token: prefill + 23 decode steps


def test_ar_stops_at_eos(loaded):
    target = make_target(loaded.model, loaded.tokenizer)
    ar = Autoregressive()
    ar.setup(target, loaded)
    prompt = [5, 6, 7, 8]
    free = ar.generate(prompt, settings(), None)
    stop = settings()
    stop.eos_ids = frozenset({free.tokens[3]})
    out = ar.generate(prompt, stop, None)
    assert out.finish_reason == "eos"
    assert out.tokens == free.tokens[: free.tokens.index(free.tokens[3]) + 1]


def test_ar_stops_at_context_limit(loaded):
    target = make_target(loaded.model, loaded.tokenizer)
    ar = Autoregressive()
    ar.setup(target, loaded)
    prompt = [10 + i % 200 for i in range(target.max_positions - 5)]
    out = ar.generate(prompt, settings(50), None)
    assert out.finish_reason == "context" and len(out.tokens) == 5


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 5, 1.0), (0.9, 0, 0.8),
                                                     (0.5, 7, 0.6)])
def test_sampling_distribution_matches_hf_warpers(temperature, top_k, top_p):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    ours = probs(logits, Sampling(temperature, top_k, top_p))
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    torch.testing.assert_close(ours, ref.softmax(-1))


def test_ar_sampling_follows_target_distribution(loaded):
    """First sampled token over many seeds ~ the target's softmax (chi-square-ish bound)."""
    target = make_target(loaded.model, loaded.tokenizer)
    ar = Autoregressive()
    ar.setup(target, loaded)
    prompt = [5, 9, 17]
    s = settings(1, temperature=1.0, top_k=8)
    expected = probs(target.prefill(prompt), s.sampling)
    gen = torch.Generator().manual_seed(0)
    n = 2000
    counts = torch.zeros_like(expected)
    for _ in range(n):
        counts[ar.generate(prompt, s, gen).tokens[0]] += 1
    assert counts[expected == 0].sum() == 0
    tv = 0.5 * (counts / n - expected).abs().sum()
    assert tv < 0.05
