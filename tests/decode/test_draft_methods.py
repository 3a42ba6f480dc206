"""Draft-model methods: greedy exactness (same and different tokenizers) and, at temperature > 0,
the target's distribution over the second token (the first verified one) for every method."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import build_tiny_lm
from tokctl.decode.methods.ar import Autoregressive
from tokctl.decode.methods.draft import DraftChain
from tokctl.decode.methods.dyspec import DySpec
from tokctl.decode.methods.recycling import TokenRecycling
from tokctl.decode.methods.rsd import RecursiveSpeculative, gumbel_top_k
from tokctl.decode.methods.spectr import SpecTr
from tokctl.decode.sampling import Sampling, Settings, probs
from tokctl.decode.target import make_target
from tokctl.models.loading import LoadedModel


def load(folder):
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return LoadedModel(model=model, tokenizer=tok, source=f"test:{folder}", load_s=0.0)


@pytest.fixture(scope="module")
def pair(tiny_lm_dir, tmp_path_factory):
    """Target and a differently initialised draft with the same tokenizer."""
    target = load(tiny_lm_dir)
    target.draft = load(build_tiny_lm(tmp_path_factory.mktemp("draft"), seed=1, layers=1))
    return target


@pytest.fixture(scope="module")
def cross_pair(tiny_lm_dir, tmp_path_factory):
    """A draft whose tokenizer has another vocabulary."""
    target = load(tiny_lm_dir)
    target.draft = load(build_tiny_lm(tmp_path_factory.mktemp("xdraft"), vocab_words=290, seed=2))
    return target


DRAFT_METHODS = {
    "draft": lambda: DraftChain(budget=4),
    "draft-auto": lambda: DraftChain(max_tokens=4),
    "dyspec": lambda: DySpec(budget=10, max_nodes=12, width=3, rounds=3),
    "rsd": lambda: RecursiveSpeculative(branching=[2, 2, 1]),
    "spectr": lambda: SpecTr(num_drafts=3, length=3),
}


def greedy(n=30):
    return Settings(max_new_tokens=n, sampling=Sampling(), eos_ids=frozenset())


def prompts(vocab):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(10, vocab, (9 + i,), generator=g).tolist() for i in range(3)]


@pytest.mark.parametrize("name", DRAFT_METHODS)
def test_greedy_is_exact_with_a_draft_model(pair, name):
    target = make_target(pair.model, pair.tokenizer)
    ar = Autoregressive()
    ar.setup(target, pair)
    method = DRAFT_METHODS[name]()
    method.setup(target, pair)
    for p in prompts(len(pair.tokenizer)):
        assert method.generate(p, greedy(), None).tokens == ar.generate(p, greedy(), None).tokens


def test_self_draft_accepts_everything(tiny_lm_dir):
    """The target drafting for itself: every drafted token must be accepted."""
    lm = load(tiny_lm_dir)
    lm.draft = lm
    target = make_target(lm.model, lm.tokenizer)
    m = DraftChain(budget=4)
    m.setup(target, lm)
    out = m.generate(prompts(len(lm.tokenizer))[0], greedy(25), None)
    assert len(out.tokens) / out.steps == pytest.approx(5.0, rel=0.25)


def test_cross_tokenizer_draft_is_exact(cross_pair):
    assert len(cross_pair.draft.tokenizer) != len(cross_pair.tokenizer)
    target = make_target(cross_pair.model, cross_pair.tokenizer)
    ar, m = Autoregressive(), DraftChain(budget=4)
    ar.setup(target, cross_pair)
    m.setup(target, cross_pair)
    assert not m.drafter.shared_vocab
    tok = cross_pair.tokenizer
    for text in ["the quick brown fox", "def average(values):"]:
        p = tok(text)["input_ids"]
        assert m.generate(p, greedy(), None).tokens == ar.generate(p, greedy(), None).tokens


def test_methods_that_need_a_draft_say_so(tiny_lm_dir):
    from tokctl.errors import UserError

    lm = load(tiny_lm_dir)
    with pytest.raises(UserError, match="draft_model="):
        DraftChain().setup(make_target(lm.model, lm.tokenizer), lm)


def test_gumbel_top_k_samples_without_replacement():
    q = torch.tensor([0.5, 0.3, 0.2, 0.0])
    g = torch.Generator().manual_seed(0)
    firsts = torch.zeros(4)
    for _ in range(3000):
        draws = gumbel_top_k(q, 3, g)
        assert len(set(draws)) == 3 and 3 not in draws
        firsts[draws[0]] += 1
    assert torch.allclose(firsts / 3000, q, atol=0.03)


SAMPLED = {
    "ar": Autoregressive,
    "recycling": lambda: TokenRecycling(budget=6),
    "draft": lambda: DraftChain(budget=3),
    "dyspec": lambda: DySpec(budget=6, max_nodes=6, width=3, rounds=2),
    "rsd": lambda: RecursiveSpeculative(branching=[3, 1]),
    "spectr": lambda: SpecTr(num_drafts=3, length=2),
}


def chi_square_p_value(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit; cells expecting fewer than 5 draws are pooled."""
    n = counts.sum()
    expected = expected_probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep].double(), exp[keep].double()
    stat = ((obs - exp) ** 2 / exp).sum()
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def test_the_chi_square_check_rejects_a_biased_sampler():
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    biased = torch.tensor([0.33, 0.33, 0.22, 0.12])
    g = torch.Generator().manual_seed(0)
    draws = torch.multinomial(biased, 600, replacement=True, generator=g)
    assert chi_square_p_value(torch.bincount(draws, minlength=4).float(), p) < 1e-4
    fair = torch.multinomial(p, 600, replacement=True, generator=g)
    assert chi_square_p_value(torch.bincount(fair, minlength=4).float(), p) > 1e-4


@pytest.mark.parametrize("name", SAMPLED)
def test_sampling_keeps_the_target_distribution(pair, name):
    """Empirical law of the second new token (the first one a verifier decides) against the exact
    marginal sum_t1 p(t1) p(t2 | t1): chi-square test at p = 1e-4."""
    target = make_target(pair.model, pair.tokenizer)
    method = SAMPLED[name]()
    method.setup(target, pair)
    if name == "recycling":  # give the matrix something to draft from
        for _ in range(5):
            method.generate(PROMPT, Settings(6, SAMPLING, frozenset()), torch.Generator().manual_seed(9))
    p_value = second_token_p_value(method, target)
    print(f"{name}: chi-square p = {p_value:.3g} over 600 draws")  # shown with pytest -s
    assert p_value > 1e-4, name


PROMPT = [12, 40, 77, 5]
SAMPLING = Sampling(temperature=1.0, top_k=3)


def second_token_law(target, prompt=PROMPT, sampling=SAMPLING) -> torch.Tensor:
    """The exact law sum_t1 p(t1) p(t2 | t1) of the second new token after ``prompt``."""
    p1 = probs(target.prefill(prompt), sampling)
    exact = torch.zeros_like(p1)
    for t1 in p1.nonzero().flatten().tolist():
        exact += p1[t1] * probs(target.prefill(prompt + [t1]), sampling)
    return exact


def second_token_counts(method, target, draws: int = 600, prompt=PROMPT,
                        sampling=SAMPLING) -> torch.Tensor:
    """How often ``method`` draws each second new token after ``prompt`` (the first one a
    verifier decides)."""
    s = Settings(max_new_tokens=2, sampling=sampling, eos_ids=frozenset())
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(target.vocab_size)
    for _ in range(draws):
        counts[method.generate(prompt, s, gen).tokens[1]] += 1
    return counts


def second_token_p_value(method, target, draws: int = 600, prompt=PROMPT,
                         sampling=SAMPLING) -> float:
    """Chi-square p-value of ``method``'s second new token after ``prompt`` against its exact
    law under ``target``."""
    exact = second_token_law(target, prompt, sampling)
    counts = second_token_counts(method, target, draws, prompt, sampling)
    assert counts[exact == 0].sum() == 0
    return chi_square_p_value(counts, exact)


def test_a_draft_too_costly_to_pay_is_skipped_but_probed(pair):
    """With a draft that costs more than it could save, the chain method decodes without running
    the draft model, except for a one-token probe every PROBE_EVERY steps; still exact."""
    target = make_target(pair.model, pair.tokenizer)
    ar = Autoregressive()
    ar.setup(target, pair)
    method = DraftChain(max_tokens=4)
    method.setup(target, pair)
    method.draft_node_cost = 100.0  # each draft token: 100 target forwards
    syncs = []
    real_sync = method.drafter.sync
    method.drafter.sync = lambda context: syncs.append(len(context)) or real_sync(context)
    p = prompts(len(pair.tokenizer))[0]
    out = method.generate(p, greedy(40), None)
    assert out.tokens == ar.generate(p, greedy(40), None).tokens
    steps = out.steps - 1  # less the prefill
    assert 0 < len(syncs) <= steps // DraftChain.PROBE_EVERY + 1
    assert set(method.chosen_sizes) == {0}
