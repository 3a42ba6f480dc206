"""Both target backends agree with a plain full forward, for chains, trees and commits."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tokctl.decode.target import FastTarget, HFTarget, make_target, tree_positions_and_mask


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def full_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids)[None]).logits[0]


def padded_target(model, tok):
    """The fixed-shape path eagerly: blocks padded to one size, as exact=true runs them."""
    return FastTarget(model, tok, exact=True, exact_block=8)


@pytest.mark.parametrize("backend", [FastTarget, HFTarget, padded_target])
def test_chain_tree_and_commit_match_full_forward(tiny_llama, backend):
    ids = torch.randint(0, 101, (24,), generator=torch.Generator().manual_seed(1))
    ref = full_logits(tiny_llama, ids)
    t = backend(tiny_llama, None)
    torch.testing.assert_close(t.prefill(ids[:10]), ref[9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t.forward(ids[10:15]), ref[10:15], atol=1e-5, rtol=1e-5)
    t.commit([0, 1, 2, 3, 4])
    # A tree whose accepted path is nodes 0 -> 2 -> 4; nodes 1 and 3 are rejected siblings.
    wrong = (ids[16] + 1) % 101
    tokens = [ids[15], wrong, ids[16], wrong, ids[17]]
    parents = [-1, 0, 0, 2, 2]
    out = t.forward(tokens, parents)
    for node, pos in ((0, 15), (2, 16), (4, 17)):
        torch.testing.assert_close(out[node], ref[pos], atol=1e-5, rtol=1e-5)
    # The rejected sibling at depth 1 sees the same context as node 2, with another token.
    alt = full_logits(tiny_llama, torch.cat([ids[:16], wrong.view(1)]))[-1]
    torch.testing.assert_close(out[1], alt, atol=1e-5, rtol=1e-5)
    t.commit([0, 2, 4])
    assert t.length == 18
    # After committing a non-contiguous path the cache continues exactly.
    torch.testing.assert_close(t.forward(ids[18:24]), ref[18:24], atol=1e-5, rtol=1e-5)
    t.commit([0, 1])
    assert t.length == 20
    torch.testing.assert_close(t.forward(ids[20:22]), ref[20:22], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [FastTarget, HFTarget, padded_target])
def test_prefill_resets_the_sequence(tiny_llama, backend):
    t = backend(tiny_llama, None)
    a = torch.arange(5, 17)
    t.prefill(a)
    t.forward([3, 4])
    t.commit([0])
    ref = full_logits(tiny_llama, a)[-1]
    torch.testing.assert_close(t.prefill(a), ref, atol=1e-5, rtol=1e-5)


def test_shared_prefill_is_reused_only_while_the_prompt_is_intact(tiny_llama):
    ids = torch.randint(0, 101, (20,), generator=torch.Generator().manual_seed(2))
    ref = full_logits(tiny_llama, ids)
    t = FastTarget(tiny_llama, None)
    t.share_prefill = True
    t.prefill(ids[:12], capacity=40)
    t.forward([7, 8, 9])
    t.commit([0, 1, 2])
    t.prefill_s = 0.0
    again = t.prefill(ids[:12], capacity=40)  # held: not recomputed, its time charged again
    assert t.forward_calls == 1 and t.shared_prefill_s > 0 and t.prefill_s == t.shared_prefill_s
    torch.testing.assert_close(again, ref[11], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t.forward(ids[12:20]), ref[12:20], atol=1e-5, rtol=1e-5)
    t.commit(list(range(8)))
    shared = t.shared_prefill_s
    t.prefill(ids[:12], capacity=10_000)  # no room in the held cache: computed afresh
    assert t.shared_prefill_s == shared
    t.truncate(5)  # the prompt's own slots may be overwritten now
    t.forward([1, 2, 3, 4, 5, 6, 7])
    t.commit(list(range(7)))
    torch.testing.assert_close(t.prefill(ids[:12], capacity=40), ref[11], atol=1e-5, rtol=1e-5)
    assert t.shared_prefill_s == shared


def test_forward_requires_commit(tiny_llama):
    t = FastTarget(tiny_llama, None)
    t.prefill([1, 2, 3])
    t.forward([4])
    with pytest.raises(RuntimeError):
        t.forward([5])


def test_tree_mask_and_depths():
    depth, mask = tree_positions_and_mask(torch.tensor([-1, 0, 0, 1, -1]))
    assert depth.tolist() == [0, 1, 1, 2, 0]
    assert mask[3].tolist() == [True, True, False, True, False]
    assert mask[4].tolist() == [False, False, False, False, True]
    with pytest.raises(ValueError):
        tree_positions_and_mask(torch.tensor([1, -1]))


def test_tree_ancestors_reach_every_level():
    from tokctl.models.fast_llama import tree_ancestors

    chain = tree_ancestors(torch.arange(-1, 19))  # 20 levels: five squarings
    assert torch.equal(chain, torch.ones(20, 20, dtype=torch.bool).tril())


def test_make_target_picks_backend(tiny_llama):
    assert make_target(tiny_llama, None).backend == "fast"
    assert make_target(tiny_llama, None, "hf").backend == "hf"
