"""The classical codecs: real files that decode, sizes that fall with quality, clear errors."""

import numpy as np
import pytest
import torch

from tokctl.errors import UserError
from tokctl.imagetok import baselines


def _photo():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 3, 6, 6, generator=g)
    return torch.nn.functional.interpolate(base, size=(32, 32), mode="bilinear")[0]


@pytest.mark.parametrize("codec", ["avif", "jxl"])
def test_sweep_makes_real_files_that_decode(codec):
    opts = baselines.options(codec, 8 if codec == "avif" else 3)
    rows = baselines.sweep(_photo()[None], codec, opts)[0]
    sizes = [len(data) for _, data, _ in rows]
    assert len(rows) == len(baselines.CODECS[codec]["qualities"])
    assert sizes[-1] > sizes[0]  # the highest quality is larger than the lowest
    magic = {"avif": b"ftypavif", "jxl": b"\xff\x0a"}[codec]
    assert magic in rows[0][1][:12]
    for _, data, img in rows:
        assert img.shape == (3, 32, 32)
        assert torch.equal(img, baselines.to_tensor(baselines.decompress(data)))
    # the best quality is close to the original
    err = (rows[-1][2] - _photo()).abs().mean()
    assert err < 0.05


def test_at_budget_takes_the_largest_file_that_fits_else_the_smallest():
    rows = [[(1, b"x" * 30, torch.zeros(3, 2, 2)), (5, b"x" * 20, torch.ones(3, 2, 2)),
             (9, b"x" * 50, torch.ones(3, 2, 2))]]
    q, sizes, _, over = baselines.at_budget(rows, 40)
    assert (q, sizes, over) == ([1], [30], 0)
    q, sizes, _, over = baselines.at_budget(rows, 10)
    assert (q, sizes, over) == ([5], [20], 1)  # the smallest file, though not the lowest quality


def test_strength_option_and_unknown_codec():
    assert baselines.options("avif", 0)["speed"] == 0
    assert baselines.options("jxl", 9)["effort"] == 9
    assert baselines.options("jpeg", 3) == {"optimize": True}
    with pytest.raises(UserError, match="known ones are"):
        baselines.check_codecs(["jpeg", "heic"])
    assert baselines.check_codecs(np.array(["jxl"])) == (["jxl"], [])
