"""tokctl/kernels/token_merge.py: ToMe's conventions, and the Triton path (interpreter mode on the
CPU, small odd shapes) against the torch reference."""

import pytest
import torch

from tokctl import kernels
from tokctl.kernels import token_merge as tm


def _inputs(batch, n, c, seed, sizes=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, c, generator=g)
    metric = torch.randn(batch, n, 11, generator=g)
    size = torch.randint(1, 5, (batch, n, 1), generator=g).float() if sizes else None
    return x, size, metric


@pytest.mark.parametrize("batch,n,c,r,protected,sizes", [
    (1, 7, 5, 2, 0, True), (2, 33, 19, 9, 1, True), (3, 50, 70, 24, 2, False), (2, 9, 3, 0, 1, True),
    (2, 26, 17, 10, 5, True), (1, 40, 130, 19, 0, False)])
def test_triton_merge_matches_reference(force_triton, batch, n, c, r, protected, sizes):
    x, size, metric = _inputs(batch, n, c, n * 31 + c, sizes)
    ref = tm.token_merge_ref(x, size, metric, r, protected)
    before = tm.CALLS["triton"]
    got = tm.token_merge(x, size, metric, r, protected)
    assert tm.CALLS["triton"] == before + (r > 0)  # the kernels ran (nothing to run for r=0)
    assert got.x.shape == (batch, n - r, c)
    torch.testing.assert_close(got.x, ref.x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.size, ref.size)
    for name in ("unm_idx", "src_idx", "dst_idx"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name


@pytest.mark.parametrize("protected", [0, 1, 2, 5])
def test_best_match_on_odd_shapes(force_triton, protected):
    g = torch.Generator().manual_seed(protected)
    metric = torch.randn(2, 75, 23, generator=g)
    ref_max, ref_idx = tm.best_match_ref(metric, protected)
    got_max, got_idx = tm.best_match_triton(metric, protected)
    torch.testing.assert_close(got_max, ref_max, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_idx.long(), ref_idx)
    pa = (protected + 1) // 2
    assert torch.isinf(got_max[:, :pa]).all() and not torch.isinf(got_max[:, pa:]).any()
    assert (got_idx[:, pa:] >= protected // 2).all()  # no edge into a protected B token


def test_half_precision_matching_matches_reference(force_triton):
    # fp16 products are exact in the fp32 accumulator; the best similarity is rounded to fp16 as
    # the reference's fp16 scores are.
    g = torch.Generator().manual_seed(3)
    metric = torch.randn(2, 139, 40, generator=g).half()
    ref_max, ref_idx = tm.best_match_ref(metric.float(), 1)
    got_max, got_idx = tm.best_match_triton(metric, 1)
    torch.testing.assert_close(got_max.float(), ref_max, rtol=2e-3, atol=2e-3)
    assert (got_idx.long() == ref_idx).float().mean() > 0.97  # fp16 rounding may flip near-ties


def test_official_order_conventions():
    """[CLS] stays first; the first patch is in set B (positions alternate over the whole
    sequence); without a protected token the kept A tokens come by descending similarity."""
    x = torch.randn(1, 9, 4)
    x[0, 5] = x[0, 6] * 3  # positions 5 (B) and 6 (A): the most similar pair (cosine 1)
    out = tm.token_merge_ref(x, None, x, 1, protected=1)
    assert out.src_idx.tolist() == [[3]] and out.dst_idx.tolist() == [[2]]  # A 3 = pos 6, B 2 = pos 5
    torch.testing.assert_close(out.x[0, 0], x[0, 0])  # [CLS]
    assert out.unm_idx.tolist() == [[0, 1, 2, 4]]
    torch.testing.assert_close(out.x[0, 4 + 2], (x[0, 5] + x[0, 6]) / 2)
    plain = tm.token_merge_ref(x, None, x, 2, protected=0)
    node_max, _ = tm.best_match_ref(x, 0)
    kept = plain.unm_idx[0].tolist()
    assert kept == sorted(kept, key=lambda i: -float(node_max[0, i]))


def test_protected_tokens_keep_their_order():
    x = torch.randn(2, 20, 6)
    for p in (2, 5):
        out = tm.token_merge_ref(x, None, torch.randn(2, 20, 3), 7, p)
        torch.testing.assert_close(out.x[:, :p], x[:, :p])


def test_merge_keeps_the_size_weighted_total():
    """Merging moves mass between tokens but never creates or loses it: sum(x * size) is kept."""
    x, size, _ = _inputs(2, 40, 8, 1)
    out = tm.token_merge_ref(x, size, x, 12, 1)
    torch.testing.assert_close((out.x * out.size).sum(1), (x * size).sum(1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.size.sum(1), size.sum(1))


def test_source_map_follows_the_merge():
    x, size, metric = _inputs(2, 21, 4, 2)
    out = tm.token_merge_ref(x, size, metric, 6, 1)
    eye = torch.eye(21).expand(2, 21, 21)
    source = tm.merge_apply(eye, out.unm_idx, out.src_idx, out.dst_idx, 1, "amax")
    torch.testing.assert_close(source @ size, out.size)
    torch.testing.assert_close(source @ (x * size) / out.size, out.x, rtol=1e-5, atol=1e-5)


def test_r_out_of_range_is_rejected():
    assert tm.max_r(197, 1) == 98 and tm.max_r(21, 1) == 10 and tm.max_r(6, 0) == 3
    with pytest.raises(ValueError):
        tm.token_merge(torch.randn(1, 6, 2), None, torch.randn(1, 6, 2), 3, protected=1)
