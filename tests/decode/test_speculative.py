"""The draft-and-verify engine: greedy exactness for every method, lossless sampling verification."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokctl.decode.budget import VerifyCost, best_size
from tokctl.decode.methods.ar import Autoregressive
from tokctl.decode.methods.hybrid import Hybrid
from tokctl.decode.methods.lookup import PromptLookup, find_continuation
from tokctl.decode.methods.recycling import TokenRecycling, grow_template
from tokctl.decode.sampling import Sampling, Settings, sample
from tokctl.decode.speculative import (DETERMINISTIC, IID, KSEQ, WITHOUT_REPLACEMENT, Draft,
                                       kseq_rho, verify)
from tokctl.decode.target import make_target
from tokctl.decode.trees import CandidateTree
from tokctl.models.loading import LoadedModel


@pytest.fixture(scope="module")
def loaded(tiny_lm_dir):
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    return LoadedModel(model=model, tokenizer=tok, source=f"test:{tiny_lm_dir}", load_s=0.0)


def greedy(n=40):
    return Settings(max_new_tokens=n, sampling=Sampling(), eos_ids=frozenset())


def prompts(vocab, count=4):
    g = torch.Generator().manual_seed(3)
    base = torch.randint(10, vocab, (12,), generator=g).tolist()
    # Repetitive prompts give lookup something to copy.
    return [base * 3, base[:5] * 4 + [7, 8], torch.randint(10, vocab, (20,), generator=g).tolist(),
            [11, 12, 13, 14] * 5][:count]


METHODS = {
    "recycling-fixed": lambda: TokenRecycling(budget=12, max_nodes=24),
    "recycling-template": lambda: TokenRecycling(budget=6, template=[[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]),
    "recycling-auto": lambda: TokenRecycling(budget="auto", max_nodes=16),
    "lookup": lambda: PromptLookup(budget=5),
    "lookup-auto": lambda: PromptLookup(max_tokens=6),
    "hybrid": lambda: Hybrid(budget=10, max_nodes=20),
}


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("backend", ["fast", "hf"])
def test_greedy_is_exact(loaded, name, backend):
    target = make_target(loaded.model, loaded.tokenizer, backend)
    ar = Autoregressive()
    ar.setup(target, loaded)
    method = METHODS[name]()
    method.setup(target, loaded)
    total_new = total_steps = 0
    for p in prompts(len(loaded.tokenizer)):
        ref = ar.generate(p, greedy(), None)
        out = method.generate(p, greedy(), None)
        assert out.tokens == ref.tokens, name
        assert sum(out.accepted_per_step) == len(out.tokens)
        total_new += len(out.tokens)
        total_steps += out.steps
    assert total_steps <= total_new


@pytest.mark.parametrize("name", ["recycling-fixed", "lookup", "hybrid"])
def test_context_limit_stops_where_ar_stops(loaded, name):
    """Near the end of the context, a draft's bonus token must not carry past the last position."""
    target = make_target(loaded.model, loaded.tokenizer, "fast")
    ar, method = Autoregressive(), METHODS[name]()
    ar.setup(target, loaded)
    method.setup(target, loaded)
    room = 9
    p = ([11, 12, 13, 14] * 200)[: target.max_positions - room]
    ref = ar.generate(p, greedy(64), None)
    out = method.generate(p, greedy(64), None)
    assert len(ref.tokens) == room and ref.finish_reason == "context"
    assert out.tokens == ref.tokens and out.finish_reason == "context"


def test_recycling_learns_and_accepts_more_than_one(loaded):
    target = make_target(loaded.model, loaded.tokenizer)
    method = TokenRecycling(budget=16, max_nodes=16)
    method.setup(target, loaded)
    p = prompts(len(loaded.tokenizer))[0]
    first = method.generate(p, greedy(60), None)
    again = method.generate(p, greedy(60), None)  # the matrix persists across prompts
    assert again.tokens == first.tokens
    assert len(again.tokens) / again.steps > len(first.tokens) / first.steps
    assert len(again.tokens) / again.steps > 1.5
    assert method.run_info()["matrix_rows_filled"] > 0


def test_recycling_matrix_saves_and_loads(loaded, tmp_path):
    target = make_target(loaded.model, loaded.tokenizer)
    path = tmp_path / "m.pt"
    a = TokenRecycling(budget=8, matrix_path=str(path))
    a.setup(target, loaded)
    a.generate(prompts(len(loaded.tokenizer))[0], greedy(20), None)
    a.finish()
    b = TokenRecycling(budget=8, matrix_path=str(path))
    b.setup(target, loaded)
    assert torch.equal(a.matrix, b.matrix)


def test_snapshot_restore_forgets_warmup(loaded):
    target = make_target(loaded.model, loaded.tokenizer)
    m = TokenRecycling(budget=8)
    m.setup(target, loaded)
    snap = m.snapshot()
    m.generate(prompts(len(loaded.tokenizer))[0], greedy(20), None)
    assert (m.matrix >= 0).any()
    m.restore(snap)
    assert not (m.matrix >= 0).any()


def test_find_continuation_prefers_longest_then_latest():
    toks = [1, 2, 3, 9, 1, 2, 3, 8, 5, 1, 2, 3]
    cont, n = find_continuation(toks, 3, 1, 2)
    assert n == 3 and cont == [8, 5]
    assert find_continuation([1, 2, 3, 4], 3, 1, 2) == ([], 0)


def test_grow_template_is_best_first_and_a_tree():
    paths = grow_template([0.6, 0.3, 0.1], max_nodes=10, max_depth=4)
    scores = [s for _, s in paths]
    assert scores == sorted(scores, reverse=True)
    seen = set()
    for p, _ in paths:
        assert len(p) == 1 or p[:-1] in seen
        seen.add(p)


def test_candidate_tree_merges_and_selects_a_closed_tree():
    t = CandidateTree()
    a = t.add(5, -1, 0.9)
    b = t.add(6, a, 0.95)  # capped by its parent
    assert t.scores[b] == 0.9
    assert t.add(5, -1, 0.2) == a and t.scores[a] == 0.9  # merged, keeps the higher score
    c = t.add(7, -1, 0.5)
    t.add(8, c, 0.4)
    d = t.select(3)
    assert d.tokens == [5, 6, 7] and d.parents == [-1, 0, -1]


def test_best_size_tracks_the_cost_curve():
    flat = VerifyCost({1: 1.0, 64: 1.0})
    steep = VerifyCost({1: 1.0, 2: 2.0, 64: 64.0})
    scores = [0.9, 0.8, 0.5, 0.3, 0.1]
    assert best_size(scores, flat)[0] == 5
    assert best_size(scores, steep)[0] == 0
    assert flat(30) == 1.0 and steep(32) == pytest.approx(32.0)


# ----------------------------------------------------------------- lossless sampling verification
V = 6


def _target_probs():
    return torch.tensor([0.35, 0.25, 0.15, 0.12, 0.08, 0.05])


def _draft_for(scheme, gen):
    """A root with 3 children (and one grandchild) drawn as the scheme says from a q unlike p."""
    q = torch.tensor([0.05, 0.1, 0.4, 0.3, 0.1, 0.05])
    d = Draft(scheme=scheme)
    if scheme == DETERMINISTIC:
        draws = [2, 3, 0]
    elif scheme == WITHOUT_REPLACEMENT:
        keys = torch.log(q) - torch.log(-torch.log(torch.rand(V, generator=gen)))
        draws = keys.topk(3).indices.tolist()
    else:
        draws = torch.multinomial(q, 3, replacement=True, generator=gen).tolist()
    for t in dict.fromkeys(draws):
        d.add(t, -1)
    d.add(1, 0)
    if scheme != DETERMINISTIC:
        d.q[-1] = q
        d.draws[-1] = draws
    return d


def _first_token_freq(scheme, trials, gen, biased=False):
    p = _target_probs()
    logits = torch.log(p).expand(8, V).clone()
    counts = torch.zeros(V)
    for _ in range(trials):
        d = _draft_for(scheme, gen)
        if biased:  # a wrong verifier: accept the first draft whenever the target likes it at all
            counts[d.tokens[0]] += 1
            continue
        path, bonus = verify(d, logits[: len(d) + 1], Sampling(temperature=1.0), gen)
        first = d.tokens[path[0]] if path else bonus
        counts[first] += 1
    return counts / trials


@pytest.mark.parametrize("scheme", [DETERMINISTIC, IID, WITHOUT_REPLACEMENT, KSEQ])
def test_verification_preserves_the_target_distribution(scheme):
    gen = torch.Generator().manual_seed(0)
    n = 6000
    freq = _first_token_freq(scheme, n, gen)
    p = _target_probs()
    # Per-token binomial bound at ~4.5 sigma: fails for any verifier off by a few percent.
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() < 4.5 * sigma + 1e-9).all(), (scheme, freq, p)


def test_a_biased_verifier_fails_the_same_check():
    gen = torch.Generator().manual_seed(0)
    n = 6000
    freq = _first_token_freq(IID, n, gen, biased=True)
    p = _target_probs()
    sigma = (p * (1 - p) / n).sqrt()
    assert not ((freq - p).abs() < 4.5 * sigma).all()


def test_kseq_rho_keeps_the_residual_a_distribution():
    p = _target_probs()
    q = torch.tensor([0.05, 0.1, 0.4, 0.3, 0.1, 0.05])
    for k in (1, 2, 4):
        rho = kseq_rho(p, q, k)
        a = torch.minimum(q, p / rho)
        beta = float(a.sum())
        assert 1.0 <= rho <= k
        assert (p - a * (1 - (1 - beta) ** k) / beta >= -1e-6).all()


def test_cap_keeps_a_closed_tree_for_batch_invariant_targets():
    from tokctl.decode.speculative import _cap

    d = Draft()
    for t, p in [(5, -1), (6, 0), (7, -1), (8, 1), (9, 2)]:
        d.add(t, p)
    capped = _cap(d, 4, Sampling())
    assert capped.tokens == [5, 6, 7] and capped.parents == [-1, 0, -1]
    assert _cap(d, None, Sampling()) is d and _cap(d, 6, Sampling()) is d


def test_sample_draws_each_row_from_its_law():
    """sampling.sample (inverse CDF, one uniform a row): each row's frequencies follow its own
    masses (unnormalised too), zero-mass entries are never drawn."""
    p = torch.tensor([[0.0, 1.0, 0.0, 0.4, 0.6], [0.3, 0.0, 0.2, 0.5, 0.0]])
    n = 20000
    draws = sample(p.repeat(n, 1), torch.Generator().manual_seed(0)).view(n, 2)
    for row in range(2):
        freq = torch.bincount(draws[:, row], minlength=5).double() / n
        assert freq[p[row] == 0].sum() == 0
        assert 0.5 * (freq - p[row].double() / p[row].sum()).abs().sum() < 0.02
    assert sample(p[0], torch.Generator().manual_seed(1)).dim() == 0  # one row: one index
