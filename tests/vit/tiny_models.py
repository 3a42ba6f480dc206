"""Tiny random ViT-family models shared by the compress-vit tests."""


import torch

from tokctl.vit.model import build_hf_random, describe


def tiny(family: str = "vit", layers: int = 3, image: int = 32, patch: int = 4, hidden: int = 32, heads: int = 2,
         labels: int = 5, seed: int = 0):
    model = build_hf_random(family, hidden, layers, heads, image, patch, labels, seed=seed)
    return model, describe(model)


def pixels(batch: int = 2, channels: int = 3, image: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, image, image, generator=torch.Generator().manual_seed(seed))
