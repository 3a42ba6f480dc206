"""The gathered-attention kernel (interpreter mode on the CPU) against its torch reference."""

import math

import pytest
import torch

from tokctl import kernels
from tokctl.kernels.gathered_attention import (gathered_attention, gathered_attention_ref,
                                               gathered_attention_triton)


def lists(kv_heads, total, count, unused, g):
    """Per-kv-head lists of distinct slots, the last ``unused`` entries -1."""
    idx = torch.stack([torch.randperm(total, generator=g)[:count] for _ in range(kv_heads)])
    if unused:
        idx[:, count - unused:] = -1
    return idx


@pytest.mark.parametrize("heads,kv_heads,dim,total,count,unused", [
    (3, 1, 24, 37, 5, 0),      # GQA 3:1 (a group not a power of two), head_dim 24
    (4, 2, 8, 150, 70, 3),     # head_dim under 16; lists over two blocks of 64, padded with -1
    (9, 3, 64, 41, 41, 0),     # SmolLM2's heads, every slot listed
    (2, 2, 16, 11, 7, 6),      # one entry used
])
def test_kernel_matches_reference(force_triton, heads, kv_heads, dim, total, count, unused):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(heads, dim, generator=g)
    k = torch.randn(kv_heads, total, dim, generator=g)
    v = torch.randn(kv_heads, total, dim, generator=g)
    idx = lists(kv_heads, total, count, unused, g)
    ref = gathered_attention_ref(q, k, v, idx)
    torch.testing.assert_close(gathered_attention_triton(q, k, v, idx), ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(gathered_attention(q, k, v, idx), ref, atol=2e-5, rtol=1e-4)
    assert kernels.counts() == {"triton": 1}  # the dispatcher took the Triton path


def test_strided_cache_views(force_triton):
    """The engine passes a slice of the whole cache (non-contiguous over layers and capacity)."""
    g = torch.Generator().manual_seed(1)
    cache = torch.randn(2, 2, 3, 50, 16, generator=g)  # [k/v, layers, kv_heads, capacity, D]
    k, v = cache[0, 1, :, :33], cache[1, 1, :, :33]
    q = torch.randn(6, 16, generator=g)
    idx = lists(3, 33, 9, 2, g)
    torch.testing.assert_close(gathered_attention_triton(q, k, v, idx),
                               gathered_attention_ref(q, k, v, idx), atol=2e-5, rtol=1e-4)


def test_empty_lists_give_zero(force_triton):
    q, k, v = torch.randn(2, 16), torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    idx = torch.full((1, 4), -1)
    assert gathered_attention_triton(q, k, v, idx).abs().max() == 0
    assert gathered_attention_ref(q, k, v, idx).abs().max() == 0


def test_reference_equals_softmax_over_the_listed_rows():
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(4, 8, generator=g), torch.randn(2, 20, 8, generator=g), torch.randn(2, 20, 8, generator=g)
    idx = torch.tensor([[3, 7, 19, -1], [0, 1, 2, 5]])
    out = gathered_attention_ref(q, k, v, idx)
    for h in range(4):
        kv = h // 2
        rows = [int(i) for i in idx[kv] if i >= 0]
        p = torch.softmax(k[kv, rows] @ q[h] / math.sqrt(8), dim=0)
        torch.testing.assert_close(out[h], p @ v[kv, rows])


def test_reference_over_every_slot_is_full_attention():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(6, 16, generator=g), torch.randn(2, 30, 16, generator=g), torch.randn(2, 30, 16, generator=g)
    idx = torch.arange(30).expand(2, 30)
    full = torch.nn.functional.scaled_dot_product_attention(q[:, None], k, v, enable_gqa=True)
    torch.testing.assert_close(gathered_attention_ref(q, k, v, idx), full[:, 0], atol=1e-5, rtol=1e-5)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="kv heads"):
        gathered_attention_ref(torch.randn(3, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8),
                               torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="one list per kv head"):
        gathered_attention_ref(torch.randn(4, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8),
                               torch.zeros(3, 1, dtype=torch.long))
