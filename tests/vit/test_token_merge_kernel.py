"""tokctl/kernels/token_merge.py: the Triton path (interpreter mode on CPU) against the torch reference."""

import pytest
import torch

from tokctl import kernels
from tokctl.kernels import token_merge as tm


@pytest.mark.parametrize("batch,n,c,r", [(1, 7, 5, 2), (2, 33, 19, 9), (3, 50, 70, 25), (2, 9, 3, 0)])
def test_triton_merge_matches_reference(force_triton, batch, n, c, r):
    g = torch.Generator().manual_seed(n * 31 + c)
    x = torch.randn(batch, n, c, generator=g)
    metric = torch.randn(batch, n, 11, generator=g)
    size = torch.randint(1, 5, (batch, n, 1), generator=g).float()
    ref = tm.token_merge_ref(x, size, metric, r)
    got = tm.token_merge(x, size, metric, r)
    assert kernels.counts() == {"triton": 1}  # the dispatcher really took the Triton path
    assert got.x.shape == (batch, n - r, c)
    torch.testing.assert_close(got.x, ref.x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.size, ref.size)
    assert torch.equal(got.src_idx, ref.src_idx) and torch.equal(got.dst_idx, ref.dst_idx)


def test_best_match_on_odd_shapes(force_triton):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 37, 23, generator=g), torch.randn(2, 18, 23, generator=g)
    ref_max, ref_idx = tm.best_match_ref(a, b)
    got_max, got_idx = tm.best_match_triton(a, b)
    torch.testing.assert_close(got_max, ref_max, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_idx, ref_idx)


def test_half_precision_matching_matches_reference(force_triton):
    # fp16 products are exact in the fp32 accumulator: the same matches as the fp32 reference
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 70, 40, generator=g).half()
    b = torch.randn(2, 69, 40, generator=g).half()
    ref_max, ref_idx = tm.best_match_ref(a, b)
    got_max, got_idx = tm.best_match_triton(a, b)
    torch.testing.assert_close(got_max, ref_max, rtol=1e-5, atol=1e-4)
    assert torch.equal(got_idx, ref_idx)


def test_merge_keeps_the_size_weighted_total():
    """Merging moves mass between tokens but never creates or loses it: sum(x * size) is kept."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 40, 8, generator=g)
    size = torch.randint(1, 4, (2, 40, 1), generator=g).float()
    out = tm.token_merge_ref(x, size, x, 12)
    torch.testing.assert_close((out.x * out.size).sum(1), (x * size).sum(1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.size.sum(1), size.sum(1))


def test_identical_tokens_merge_first():
    x = torch.randn(1, 10, 4)
    x[0, 2] = x[0, 3]  # A position 1 and B position 1 are the same token
    out = tm.token_merge_ref(x, torch.ones(1, 10, 1), x, 1)
    assert out.src_idx.tolist() == [[1]] and out.dst_idx.tolist() == [[1]]


def test_r_out_of_range_is_rejected():
    with pytest.raises(ValueError):
        tm.token_merge(torch.randn(1, 6, 2), torch.ones(1, 6, 1), torch.randn(1, 6, 2), 4)
