import pytest
import torch

from tokctl.kernels.nearest_code import nearest_code, nearest_code_ref


@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (7, 5, 3), (33, 70, 12), (19, 129, 65)])
def test_triton_matches_reference(force_triton, n, k, d):
    g = torch.Generator().manual_seed(n * 1000 + k)
    x, codes = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    index, dist = nearest_code(x, codes)
    ref_index, ref_dist = nearest_code_ref(x, codes)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(dist, ref_dist, rtol=1e-4, atol=1e-4)
    brute = torch.cdist(x, codes).pow(2).min(1)
    torch.testing.assert_close(dist, brute.values, rtol=1e-3, atol=1e-3)


def test_strided_input_and_ties(force_triton):
    codes = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # codes 0 and 1 tie
    x = torch.tensor([[2.0, 9.0, 0.1], [0.0, 9.0, 3.0]])[:, ::2]  # non-contiguous rows
    index, _ = nearest_code(x, codes)
    assert index.tolist() == [0, 2]  # the lowest index wins a tie, as torch.argmin does


def test_reference_path_by_default():
    x, codes = torch.randn(4, 3), torch.randn(6, 3)
    index, _ = nearest_code(x, codes)
    assert torch.equal(index, nearest_code_ref(x, codes)[0])


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        nearest_code(torch.randn(4, 3), torch.randn(6, 2))
