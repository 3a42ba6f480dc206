"""Analytic FLOPs against the literature's figure, and the merge figure."""

import torch

from tokctl.vit import flops
from tokctl.vit.model import build_hf_random, describe
from tokctl.vit.visualize import patch_owner, save_merge_figure


def test_vit_b16_costs_17_6_gflops():
    info = describe(build_hf_random("vit", 768, 12, 12, 224, 16, 1000))
    assert abs(flops.gflops(info, [(197, 197)] * 12) - 17.56) < 0.01


def test_fewer_tokens_cost_less_and_attention_is_quadratic():
    assert flops.attention_macs(100, 64) - 4 * 100 * 64 * 64 == 2 * 100 * 100 * 64
    assert flops.mlp_macs(10, 8, 32) == 2 * 10 * 8 * 32


def test_patch_owner_and_png(tmp_path):
    source = torch.zeros(3, 5)  # prefix + 2 tokens over prefix + 4 patches
    source[0, 0] = 1
    source[1, 1:3] = 1
    source[2, 3] = 1  # patch 4 is held by no token: pruned
    assert patch_owner(source, 1).tolist() == [0, 0, 1, -1]
    images = torch.randint(0, 255, (2, 1, 8, 8), dtype=torch.uint8)
    path = save_merge_figure(tmp_path / "m.png", images, torch.stack([source, source]), 1, (2, 2))
    from PIL import Image

    assert Image.open(path).size[0] > 8
