"""method=tidal and method=recycled_attention on a tiny random Llama: the sparse read path, its
bookkeeping, and its errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import build_tiny_lm
from tokctl import kernels
from tokctl.decode.methods.ar import Autoregressive
from tokctl.decode.methods.recycled_attention import RecycledAttention, RecycledPolicy
from tokctl.decode.methods.tidal import TidalDecode, TidalPolicy
from tokctl.decode.sampling import Sampling, Settings
from tokctl.decode.target import make_target
from tokctl.errors import UserError
from tokctl.models.loading import LoadedModel

LAYERS = 6


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    folder = build_tiny_lm(tmp_path_factory.mktemp("tiny6"), layers=LAYERS, seed=3)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return LoadedModel(model=model, tokenizer=tok, source="test", load_s=0.0)


def settings(n=12):
    return Settings(max_new_tokens=n, sampling=Sampling(), eos_ids=frozenset())


def prompt(n=60, seed=0):
    return torch.randint(6, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def ready(method, loaded, backend="fast"):
    method.setup(make_target(loaded.model, loaded.tokenizer, backend), loaded)
    return method


def ar_tokens(loaded, ids, n=12):
    return ready(Autoregressive(), loaded).generate(ids, settings(n), None).tokens


def with_policy(loaded, policy, ids, n=12):
    """`ar`'s loop with a policy installed directly (budgets above the prompt's length, which the
    methods refuse, make a sparse step read every slot)."""
    ar = ready(Autoregressive(), loaded)
    ar.target.fast.layer_attention = policy
    try:
        return ar.generate(ids, settings(n), None).tokens
    finally:
        ar.target.fast.layer_attention = None


def test_budgets_covering_the_cache_equal_full_attention(loaded):
    """Every slot listed: the gathered path (new tokens included) must reproduce `ar` exactly."""
    ids = prompt()
    fast = ready(Autoregressive(), loaded).target.fast
    base = ar_tokens(loaded, ids)
    tidal = TidalPolicy(LAYERS, fast.attention, 1, 3, top_k=10 ** 6)
    assert with_policy(loaded, tidal, ids) == base
    assert tidal.cache_read() == [1.0] * LAYERS
    recycled = RecycledPolicy(LAYERS, fast.attention, stride=4, top_k=10 ** 6)
    assert with_policy(loaded, recycled, ids) == base


def test_tidal_reads_top_k_above_the_selection_layer(loaded):
    ids = prompt(80)
    m = ready(TidalDecode(top_k=8, selection_layer=2, reselection_layer=4), loaded)
    gen = m.generate(ids, settings(), None)
    assert len(gen.tokens) == 12 and gen.finish_reason == "length"
    read = gen.extra["cache_read"]
    assert read[:3] == [1.0, 1.0, 1.0] and read[4] == 1.0  # full below, selection, re-selection
    for layer in (3, 5):
        assert 8 / 92 <= read[layer] <= 8 / 81  # 8 of 81..92 slots over the 12 steps
    assert m.run_info() == {"top_k": 8, "selection_layer": 2, "reselection_layer": 4}


def test_tidal_reselection_auto_scales_with_depth(loaded):
    m = ready(TidalDecode(top_k=8), loaded)
    assert m.reselection_layer == max(3, round(13 * LAYERS / 32))


def test_recycled_attention_full_every_stride_steps(loaded):
    ids = prompt(80)
    m = ready(RecycledAttention(stride=5, top_k=8), loaded)
    gen = m.generate(ids, settings(11), None)
    # Decode steps 1 and 6 are full (after the prefill's first token, 10 steps); the others read
    # 8 recycled slots plus the tokens generated since the full step.
    read = gen.extra["cache_read"]
    assert len(read) == LAYERS and len(set(read)) == 1
    steps = list(range(81, 91))  # window sizes of the 10 decode steps
    expected = [1.0 if s in (81, 86) else (8 + (s - 81) % 5) / s for s in steps]
    assert read[0] == pytest.approx(sum(expected) / 10, abs=1e-4)


def test_sparse_methods_leave_the_engine_as_they_found_it(loaded):
    m = ready(TidalDecode(top_k=8, selection_layer=1), loaded)
    m.generate(prompt(), settings(4), None)
    assert m.target.fast.layer_attention is None


def test_triton_path_runs_in_the_engine(loaded, force_triton, monkeypatch):
    ids = prompt(40)
    m = ready(RecycledAttention(stride=3, top_k=6), loaded)
    with_triton = m.generate(ids, settings(5), None).tokens
    assert kernels.counts().get("triton", 0) > 0
    monkeypatch.setenv("TOKCTL_TRITON", "0")
    assert m.generate(ids, settings(5), None).tokens == with_triton


@pytest.mark.parametrize("make,needle", [
    (lambda: TidalDecode(top_k=0), "top_k"),
    (lambda: TidalDecode(selection_layer=-1), "selection_layer"),
    (lambda: RecycledAttention(stride=0), "stride"),
    (lambda: RecycledAttention(top_k=0), "top_k"),
])
def test_bad_settings_are_user_errors(make, needle):
    with pytest.raises(UserError, match=needle):
        make()


@pytest.mark.parametrize("kwargs,needle", [
    ({"selection_layer": LAYERS - 1}, "selection_layer"),
    ({"selection_layer": 2, "reselection_layer": 2}, "reselection_layer"),
    ({"reselection_layer": LAYERS}, "reselection_layer"),
])
def test_layers_outside_the_model_are_user_errors(loaded, kwargs, needle):
    with pytest.raises(UserError, match=needle):
        ready(TidalDecode(**kwargs), loaded)


def test_budget_beyond_the_prompt_is_a_user_error(loaded):
    m = ready(RecycledAttention(top_k=60), loaded)
    with pytest.raises(UserError, match="top_k=60"):
        m.generate(prompt(60), settings(), None)


def test_hf_backend_is_refused(loaded):
    with pytest.raises(UserError, match="model.backend=fast"):
        ready(TidalDecode(), loaded, backend="hf")


def test_full_model_nll_reuses_the_prompt_and_matches_a_fresh_prefill(loaded):
    from tokctl.decode.long_figures import full_model_nll

    ar = ready(Autoregressive(), loaded)
    ids = prompt(30)
    gen = ar.generate(ids, settings(6), None)
    calls = ar.target.forward_calls
    reused = full_model_nll(ar.target, ids, gen.tokens)
    assert ar.target.forward_calls == calls + 1  # one block, no prefill
    ar.target.prompt = None
    fresh = full_model_nll(ar.target, ids, gen.tokens)
    assert reused[1] == fresh[1] == 6
    assert reused[0] == pytest.approx(fresh[0], rel=1e-4, abs=1e-4)
