import math

import pytest
import torch

from tokctl.imagetok.quantizers import FSQ, ResidualVQ, VectorQuantizer


def test_fsq_ids_round_trip_and_cover_codebook():
    q = FSQ((8, 5, 4))
    assert q.codebook_size == 160 and q.bits_per_id == 8
    z = torch.randn(2, 500, 3) * 3
    out = q(z)
    assert out.ids.shape == (2, 500, 1)
    assert out.ids.min() >= 0 and out.ids.max() < 160
    torch.testing.assert_close(q.embed(out.ids), out.values)
    # every id names a distinct code vector (the mixed-radix numbering is a bijection)
    every = q.embed(torch.arange(160).view(1, 160, 1))
    assert len(torch.unique(every.reshape(160, 3), dim=0)) == 160


def test_fsq_straight_through_gradient():
    q = FSQ((8, 8))
    z = torch.randn(3, 4, 2, requires_grad=True)
    q(z).values.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_vq_kmeans_init_ema_and_dead_code_restart():
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=16, dim=4, normalize=True, dead_code_threshold=0.5)
    q.train()
    z = torch.randn(8, 10, 4, requires_grad=True)
    out = q(z)
    assert bool(q.initialised)  # k-means ran on the first training batch
    assert torch.allclose(q.codes().norm(dim=-1), torch.ones(16), atol=1e-5)
    torch.testing.assert_close(q.embed(out.ids), out.values.detach().reshape(8, 10, 4)
                               .div(1.0), rtol=1e-5, atol=1e-5)
    # codes nobody uses get restarted onto encoder outputs (ema_size reset to 1)
    q.ema_size[:4] = 0.0
    q(torch.randn(8, 10, 4))
    assert (q.ema_size[:4] >= 0.5).all()
    out.loss.backward()
    assert z.grad is not None


def test_vq_usage_and_entropy():
    q = VectorQuantizer(codebook_size=8, dim=2, normalize=False, kmeans_init=False)
    q.eval()
    q.reset_usage()
    q.count_usage(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    u = q.usage()
    assert u["codes_used"] == 4 and u["usage"] == 0.5
    assert math.isclose(u["entropy_bits"], 2.0, rel_tol=1e-6)
    assert u["max_entropy_bits"] == 3.0


def test_rvq_residual_stages_and_partial_embed():
    torch.manual_seed(0)
    q = ResidualVQ(codebook_size=16, dim=4, depth=3)
    q.train()
    z = torch.randn(4, 5, 4)
    q(z)  # k-means init of each stage
    q.eval()
    out = q(z)
    assert out.ids.shape == (4, 5, 3)
    full = q.embed(out.ids)
    torch.testing.assert_close(full, out.values, rtol=1e-5, atol=1e-5)
    err = [(z - q.embed(torch.where(torch.arange(3) < d, out.ids, -1))).pow(2).mean()
           for d in (1, 2, 3)]
    assert err[0] >= err[1] >= err[2]  # each stage refines what the previous left


def test_fsq_two_levels_and_extreme_inputs_stay_in_range():
    q = FSQ((2, 3, 8))
    z = torch.tensor([[[-50.0, -50.0, -50.0], [50.0, 50.0, 50.0], [0.0, 0.0, 0.0]]])
    out = q(z)
    assert torch.isfinite(out.values).all() and torch.isfinite(q.relax(z)).all()
    assert out.ids.min() >= 0 and out.ids.max() < q.codebook_size
    assert out.ids[0, 0, 0] == 0 and out.ids[0, 1, 0] == q.codebook_size - 1  # the corners
    torch.testing.assert_close(q.embed(out.ids), out.values)


def test_sparse_usage_counts_agree_with_the_dense_table(monkeypatch):
    """Codebooks over DENSE_COUNTS keep only the ids seen; the figures are the same."""
    from tokctl.imagetok.quantizers import base

    ids = [torch.randint(0, 64, (3, 5, 1), generator=torch.Generator().manual_seed(s))
           for s in range(3)]
    dense, sparse = FSQ((4, 4, 4)), FSQ((4, 4, 4))
    for t in ids:
        dense.count_usage(t)
    monkeypatch.setattr(base, "DENSE_COUNTS", 8)
    for t in ids:
        sparse.count_usage(t)
    assert isinstance(sparse._counts, tuple) and not isinstance(dense._counts, tuple)
    assert sparse.usage() == pytest.approx(dense.usage())
    sparse.counting = False  # refinement's trials are not counted
    sparse.count_usage(torch.zeros(3, 5, 1, dtype=torch.long))
    assert sparse.usage() == pytest.approx(dense.usage())
