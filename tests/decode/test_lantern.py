"""The token prior as a decoding-engine target and LANTERN's relaxed acceptance on it: tree
forwards agree with the prior's own forward, the drafting methods stay lossless, delta=0 is
exact speculative sampling, and delta>0 moves each position's law by at most delta."""

import pytest
import torch

from test_draft_methods import (chi_square_p_value, second_token_counts, second_token_law,
                                second_token_p_value)
from tokctl.decode.methods.draft import DraftChain
from tokctl.decode.methods.lantern import (Lantern, moved, nearest_codes, neighbourhoods,
                                           relaxed_verify)
from tokctl.decode.methods.lookup import PromptLookup
from tokctl.decode.methods.recycling import TokenRecycling
from tokctl.decode.sampling import Sampling
from tokctl.decode.speculative import IID, Draft
from tokctl.errors import UserError
from tokctl.imagetok.prior import TokenPrior
from tokctl.imagetok.prior_target import PriorSource, PriorTarget

V = 16
SAMPLING = Sampling(temperature=1.0)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one torch thread (two stall when the other core is busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def prior():
    torch.manual_seed(0)
    model = TokenPrior(vocab=V, max_tokens=8, width=16, layers=1, heads=2).eval()
    with torch.no_grad():  # a peaked head: acceptances happen, and the law is not uniform
        model.head.weight.mul_(30)
    return model


@pytest.fixture(scope="module")
def draft_prior():
    """A smaller prior (another random initialisation, a softer head) as the draft model."""
    torch.manual_seed(1)
    model = TokenPrior(vocab=V, max_tokens=8, width=8, layers=1, heads=1).eval()
    with torch.no_grad():
        model.head.weight.mul_(10)
    return model


def setup(method, prior, draft=None):
    target = PriorTarget(prior)
    loaded = PriorSource("test:tiny-prior", prior,
                         draft and PriorSource("test:tiny-draft-prior", draft))
    loaded.code_vectors = torch.randn(V, 3, generator=torch.Generator().manual_seed(2))
    method.setup(target, loaded)
    return target


def test_tree_forward_matches_the_prior(prior):
    ids = torch.randint(0, V, (7,), generator=torch.Generator().manual_seed(0))
    full = prior(ids[None])[0].detach()
    t = PriorTarget(prior)
    assert torch.allclose(t.prefill([V]), full[0], atol=1e-5)
    t.commit([])
    # a tree below the committed prefix: node 1 is a sibling of node 0, node 2 node 0's child
    logits = t.forward([int(ids[0]), (int(ids[0]) + 1) % V, int(ids[1])], [-1, -1, 0])
    t.commit([0, 2])
    assert torch.allclose(logits[0], full[1], atol=1e-5)
    assert torch.allclose(logits[2], full[2], atol=1e-5)
    assert torch.allclose(t.forward(ids[2:5])[-1], full[5], atol=1e-5)
    t.commit([0, 1, 2])
    assert torch.allclose(t.step(int(ids[5])), full[6], atol=1e-5)  # the lean one-token step


@pytest.mark.parametrize("make", [lambda: TokenRecycling(k=4, budget=6),
                                  lambda: PromptLookup(budget=4),
                                  lambda: Lantern(base="recycling", k=3, delta=0.0,
                                                  base_args={"budget": 6, "k": 4})],
                         ids=["recycling", "lookup", "lantern-delta0"])
def test_sampling_on_the_prior_is_exact(prior, make):
    method = make()
    target = setup(method, prior)
    assert second_token_p_value(method, target, 400, prompt=[V], sampling=SAMPLING) > 1e-4


@pytest.mark.parametrize("make", [lambda: DraftChain(max_tokens=3, budget=3),
                                  lambda: Lantern(base="draft", k=3, delta=0.0,
                                                  base_args={"budget": 3, "max_tokens": 3}),
                                  lambda: Lantern(base="draft", k=3, delta=0.0, draft_probs=True,
                                                  base_args={"budget": 3, "max_tokens": 3})],
                         ids=["draft", "lantern-draft-delta0", "lantern-draft-probs-delta0"])
def test_a_smaller_prior_drafts_exactly(prior, draft_prior, make):
    """method=draft with a smaller prior as the draft (its probabilities verified by speculative
    sampling), and LANTERN over it at delta=0, keep the target's law."""
    method = make()
    target = setup(method, prior, draft_prior)
    assert method.needs_draft
    assert second_token_p_value(method, target, 400, prompt=[V], sampling=SAMPLING) > 1e-4


def test_relaxed_speculative_sampling_with_draft_probabilities():
    """A chain drafted from q, draft_probs: LANTERN accepts x with min(1, p~_x(x)/q(x)) and
    else resamples from (p~_x - q)+, p~_x the target with x's neighbourhood moved onto x; the
    token decoded follows that exact mixture (chi-square). Without q (the default) it is the
    mixture of the p~_x, within delta of p."""
    g = torch.Generator().manual_seed(4)
    p = torch.softmax(torch.randn(V, generator=g) * 1.5, 0)
    q = torch.softmax(torch.randn(V, generator=g) * 1.5, 0)
    near = nearest_codes(torch.randn(V, 2, generator=g), 5)
    delta = 0.2
    logits = torch.log(p)[None].repeat(2, 1)
    law, without_q = torch.zeros(V), torch.zeros(V)
    for x in range(V):
        relaxed = moved(p, [x], neighbourhoods([x], p, near, delta))
        without_q += q[x] * relaxed
        accept = min(1.0, float(relaxed[x] / q[x]))
        law[x] += q[x] * accept
        law += q[x] * (1 - accept) * (relaxed - q).clamp_min(0) / (relaxed - q).clamp_min(0).sum()
    assert 0 < 0.5 * float((without_q - p).abs().sum()) <= delta + 1e-9
    counts = torch.zeros(V)
    for _ in range(3000):
        x = int(torch.multinomial(q, 1, generator=g))
        draft = Draft(scheme=IID)
        draft.add(x, -1)
        draft.q[-1], draft.draws[-1] = q, [x]
        path, bonus = relaxed_verify(draft, logits, SAMPLING, g, near, delta)
        counts[x if path else bonus] += 1
    assert chi_square_p_value(counts, law) > 1e-4


def test_relaxed_law_is_the_target_with_neighbourhood_mass_moved():
    """One node, two drafted children: the accepted token's law is p with each child's claimed
    neighbours' mass moved onto it, at most delta in total variation from p (checked exactly),
    and relaxed_verify draws from it (chi-square)."""
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(V, generator=g) * 1.5, 0)
    near = nearest_codes(torch.randn(V, 2, generator=g), 5)
    kids, delta = [3, 9], 0.15
    owner = neighbourhoods(kids, p, near, delta)
    law = torch.zeros(V)
    for y in range(V):
        law[kids[owner[y]] if y in owner else y] += p[y]
    tv = 0.5 * float((law - p).abs().sum())
    assert 0 < tv <= delta + 1e-9
    assert neighbourhoods(kids, p, near, 0.0) == {3: 0, 9: 1}  # delta 0 claims nothing
    draft = Draft()
    for t in kids:
        draft.add(t, -1)
    logits = torch.log(p)[None].repeat(1 + len(kids), 1)  # rows of the root and each child
    counts = torch.zeros(V)
    for _ in range(3000):
        path, bonus = relaxed_verify(draft, logits, SAMPLING, g, near, delta)
        counts[kids[path[0]] if path else bonus] += 1
    assert chi_square_p_value(counts, law) > 1e-4


def test_delta_bounds_the_decoded_law(prior):
    """End to end on the tiny prior: the second token's empirical law is within delta (plus
    sampling noise, about 0.05 for 1500 draws over 16 codes) of the target's."""
    method = Lantern(base="recycling", k=4, delta=0.1, base_args={"budget": 6, "k": 4})
    target = setup(method, prior)
    exact = second_token_law(target, [V], SAMPLING)
    counts = second_token_counts(method, target, 1500, [V], SAMPLING)
    assert 0.5 * float((counts / counts.sum() - exact).abs().sum()) <= 0.1 + 0.1


@pytest.mark.parametrize("kwargs,message", [({"delta": 1.5}, "[0, 1]"), ({"delta": -0.1}, "[0, 1]"),
                                            ({"base": "nope"}, "not a drafting method"),
                                            ({"base": "ar"}, "not a draft-and-verify")])
def test_bad_options_one_line(kwargs, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Lantern(**kwargs)


def test_k_larger_than_the_codebook(prior):
    with pytest.raises(UserError, match="at most 15 neighbours"):
        setup(Lantern(k=V, base_args={"budget": 4}), prior)
