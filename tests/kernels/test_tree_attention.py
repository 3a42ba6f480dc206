"""The tree-attention kernel (interpreter mode on the CPU) against its torch reference."""

import pytest
import torch

from tokctl import kernels
from tokctl.kernels.tree_attention import (allowed_mask, tree_attention, tree_attention_exact,
                                           tree_attention_ref, tree_attention_triton)


def tree_mask(parents):
    n = len(parents)
    m = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            m[i] |= m[p]
    return m


@pytest.mark.parametrize("heads,kv_heads,dim,prefix,parents", [
    (3, 1, 16, 5, [-1, 0, 0, 1, -1]),                 # odd sizes, GQA 3:1, a forest
    (4, 2, 24, 37, [-1, 0, 1, 2, 0, 4, 1]),           # head_dim not a power of two
    (2, 2, 32, 0, [-1, 0, 1]),                        # no prefix at all
    (2, 1, 16, 19, list(range(-1, 20))),              # a chain longer than one query block
    (4, 2, 8, 150, [-1, 0, 0, 1]),                    # head_dim under tl.dot's 16; keys over 2 blocks
])
def test_kernel_matches_reference(force_triton, heads, kv_heads, dim, prefix, parents):
    g = torch.Generator().manual_seed(0)
    n = len(parents)
    q = torch.randn(heads, n, dim, generator=g)
    k = torch.randn(kv_heads, prefix + n, dim, generator=g)
    v = torch.randn(kv_heads, prefix + n, dim, generator=g)
    m = allowed_mask(prefix, tree_mask(parents))
    ref = tree_attention_ref(q, k, v, m)
    torch.testing.assert_close(tree_attention_triton(q, k, v, m), ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(tree_attention(q, k, v, m), ref, atol=2e-5, rtol=1e-4)
    assert kernels.counts() == {"triton": 1}  # the dispatcher took the Triton path


def test_causal_when_no_mask(force_triton):
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 6, 16, generator=g), torch.randn(1, 9, 16, generator=g), torch.randn(1, 9, 16, generator=g)
    torch.testing.assert_close(tree_attention_triton(q, k, v, allowed_mask(3, None, 6)),
                               tree_attention_ref(q, k, v, allowed_mask(3, tree_mask(list(range(-1, 5))))),
                               atol=2e-5, rtol=1e-4)


def test_free_slots_past_the_block_are_ignored(force_triton):
    """A compiled step attends over the whole cache capacity: slots the mask hides change nothing."""
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 3, 16, generator=g), torch.randn(1, 40, 16, generator=g), torch.randn(1, 40, 16, generator=g)
    m = torch.zeros(3, 40, dtype=torch.bool)
    m[:, :9] = allowed_mask(6, tree_mask([-1, 0, 0]))
    short = tree_attention_ref(q, k[:, :9], v[:, :9], m[:, :9])
    torch.testing.assert_close(tree_attention_ref(q, k, v, m), short, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(tree_attention_triton(q, k, v, m), short, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("heads,kv_heads", [(2, 1), (6, 2), (3, 3)])
def test_reference_matches_plain_softmax_attention(heads, kv_heads):
    """Query head h reads kv head h // (heads / kv_heads); q comes strided, as the forward's
    transposed projection gives it."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, heads, 8, generator=g).transpose(0, 1)
    k, v = torch.randn(kv_heads, 7, 8, generator=g), torch.randn(kv_heads, 7, 8, generator=g)
    m = tree_mask([-1, 0, -1])
    allowed = torch.cat([torch.ones(3, 4, dtype=torch.bool), m], 1)
    kk = k.repeat_interleave(heads // kv_heads, 0)
    vv = v.repeat_interleave(heads // kv_heads, 0)
    scores = (q @ kk.transpose(-1, -2)) / 8 ** 0.5
    manual = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vv
    torch.testing.assert_close(tree_attention_ref(q, k, v, allowed), manual)


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (2, 2)])
def test_prefill_mask_takes_the_causal_path_with_the_same_result(heads, kv_heads):
    """A square lower-triangular mask (a prefill from slot 0) runs as SDPA's is_causal."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(heads, 11, 8, generator=g)
    k, v = torch.randn(kv_heads, 11, 8, generator=g), torch.randn(kv_heads, 11, 8, generator=g)
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    kk = k.repeat_interleave(heads // kv_heads, 0)
    vv = v.repeat_interleave(heads // kv_heads, 0)
    scores = (q @ kk.transpose(-1, -2)) / 8 ** 0.5
    manual = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ vv
    torch.testing.assert_close(tree_attention_ref(q, k, v, causal), manual)
    causal[5, 2] = False  # no longer causal: the masked path, still right
    manual = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ vv
    torch.testing.assert_close(tree_attention_ref(q, k, v, causal), manual)


def test_exact_attention_does_not_depend_on_where_the_keys_sit():
    """The same keys, contiguous or with masked slots between them (a tree's node past its
    siblings): exact attention gives the same bf16 bits; bf16 SDPA does not always."""
    g = torch.Generator().manual_seed(5)
    sdpa_differs = 0
    for trial in range(12):
        n_keys, gaps = 600 + trial, {5, 300, 590}
        q = torch.randn(9, 4, 64, generator=g).bfloat16()
        k, v = (torch.randn(3, n_keys, 64, generator=g).bfloat16() for _ in range(2))
        slots = [j + sum(gap <= j for gap in gaps) for j in range(n_keys)]  # a junk slot at each gap
        kg, vg = (torch.randn(3, n_keys + len(gaps), 64, generator=g).bfloat16() for _ in range(2))
        kg[:, slots], vg[:, slots] = k, v
        live = torch.zeros(4, n_keys + len(gaps), dtype=torch.bool)
        live[:, slots] = True
        together = (q, k, v, torch.ones(4, n_keys, dtype=torch.bool))
        apart = (q, kg, vg, live)
        assert torch.equal(tree_attention_exact(*together), tree_attention_exact(*apart))
        sdpa_differs += not torch.equal(tree_attention_ref(*together), tree_attention_ref(*apart))
        torch.testing.assert_close(tree_attention_exact(*together), tree_attention_ref(*together),
                                   atol=2e-2, rtol=2e-2)
    assert sdpa_differs > 0  # what the float64 path is for (torch 2.13's CPU kernels)


def test_dispatch_uses_reference_on_cpu_by_default(monkeypatch):
    import tokctl.kernels.tree_attention as ta

    monkeypatch.setenv("TOKCTL_TRITON", "auto")
    monkeypatch.setattr(ta, "tree_attention_triton", lambda *a: (_ for _ in ()).throw(AssertionError))
    q = torch.randn(1, 2, 8)
    k = torch.randn(1, 5, 8)
    tree_attention(q, k, k, allowed_mask(3, None, 2))


def test_fast_target_runs_on_the_kernel(force_triton):
    """The lean Llama forward with the kernel on its hot path matches transformers' forward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tokctl.decode.target import FastTarget

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (12,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    t = FastTarget(model, None)
    torch.testing.assert_close(t.prefill(ids[:8]), ref[7], atol=1e-4, rtol=1e-4)
    wrong = (ids[9] + 1) % 50
    out = t.forward([ids[8], wrong, ids[9], ids[10]], [-1, 0, 0, 2])
    for node, pos in ((0, 8), (2, 9), (3, 10)):
        torch.testing.assert_close(out[node], ref[pos], atol=1e-4, rtol=1e-4)
    # the verification forward ran its attention on the Triton kernel, through the production path
    assert kernels.counts().get("triton", 0) >= cfg.num_hidden_layers


def test_reference_on_a_gpu_without_triton_is_a_warning_and_a_field(monkeypatch, capsys):
    """The slow reference serving GPU tensors is never silent: one warning line, and the dispatch
    counts that commands write to metrics.json as ``kernel``."""
    monkeypatch.setattr(kernels, "triton_import_error", lambda: "ImportError: no triton")
    monkeypatch.setattr(kernels, "_warned", set())
    monkeypatch.setenv("TOKCTL_TRITON", "auto")
    kernels.reset_counts()
    gpu_like = torch.empty(0)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert kernels.use_triton(gpu_like) is False
    assert kernels.use_triton(gpu_like) is False
    assert kernels.path_taken() == "reference"
    out = capsys.readouterr().out
    assert out.count("warning") == 1 and "kernel: reference" in out
