"""Tiny tokenizers and images shared by the tokenize-image tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tokctl.imagetok.checkpoint import build_tokenizer, save_tokenizer

TINY = {"image_size": 32, "patch_size": 8, "width": 32, "heads": 2, "encoder_layers": 1,
        "decoder_layers": 1, "stem": "conv", "conv_channels": [8, 8, 8]}
QUANTIZERS = {
    "fsq": {"_target_": "tokctl.imagetok.quantizers.FSQ", "name": "fsq", "levels": [4, 4, 4]},
    "vq": {"_target_": "tokctl.imagetok.quantizers.VectorQuantizer", "name": "vq",
           "codebook_size": 32, "dim": 6},
    "rvq": {"_target_": "tokctl.imagetok.quantizers.ResidualVQ", "name": "rvq",
            "codebook_size": 16, "dim": 6, "depth": 2},
}
TARGETS = {"titok": "TiTok", "onedpiece": "OneDPiece", "flexnested": "FlexNested", "vq2d": "VQ2D"}


def tiny_config(kind: str = "onedpiece", quantizer: str = "fsq", **over) -> dict:
    cfg = {"_target_": f"tokctl.imagetok.models.{TARGETS[kind]}", "name": kind, **TINY}
    if kind != "vq2d":
        cfg["num_latents"] = 6
    cfg.update(over)
    cfg["quantizer"] = dict(QUANTIZERS[quantizer])
    return cfg


def make_tiny(kind: str = "onedpiece", quantizer: str = "fsq", seed: int = 0, **over):
    torch.manual_seed(seed)
    cfg = tiny_config(kind, quantizer, **over)
    return build_tokenizer(cfg).eval(), cfg


@pytest.fixture
def tiny_tokenizer_file(tmp_path):
    """A saved tiny onedpiece tokenizer (.pt) and its config."""
    model, cfg = make_tiny("onedpiece", "fsq")
    path = tmp_path / "tiny.pt"
    save_tokenizer(path, model, cfg, {"steps": 0})
    return path, cfg


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    # smooth random images (a random field upsampled), more image-like than white noise
    base = torch.rand(5, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(base, size=(32, 32), mode="bilinear",
                                           align_corners=False).clamp(0, 1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one thread avoids the stalls of two threads
    fighting another busy process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def photo_folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        small = rng.random((6, 8, 3))
        im = Image.fromarray((small * 255).astype(np.uint8)).resize((80, 60), Image.BICUBIC)
        im.save(folder / f"p{i}.png")
    (folder / "screenshot.png").write_bytes(b"skipped by name")
    return folder


def tiny_overrides(folder, steps=4):
    ov = [f"data.folders=[{folder}]", f"train.steps={steps}", "train.batch_size=4",
          "train.ae_warmup_steps=2", "train.log_every=1", "train.val_every=2",
          "train.val_images=4", "train.checkpoint_every=2", "train.lr_warmup_steps=1",
          "threads=1", "tokenizer.num_latents=6"]
    ov += [f"tokenizer.{k}={v}" for k, v in TINY.items() if k != "conv_channels"]
    return ov + ["tokenizer.conv_channels=[8,8,8]", "quantizer.levels=[4,4,4]"]


@pytest.fixture
def tiny_prior(tiny_tokenizer_file, tmp_path):
    """A tiny prior for the tiny tokenizer, trained a few steps on its tokens of random images
    so its probabilities are not uniform."""
    from tokctl.imagetok import prior as prior_mod
    from tokctl.imagetok.checkpoint import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_file[0])
    torch.manual_seed(0)
    cfg = {"vocab": tok.model.codebook_size, "max_tokens": tok.model.max_tokens, "width": 16,
           "layers": 1, "heads": 2}
    model = prior_mod.build_prior(cfg)
    ids = tok.model.encode(torch.rand(32, 3, 32, 32))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        loss = model.loss_bits(ids).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path / "tiny.prior.pt"
    prior_mod.save_prior(path, model.eval(), cfg, tok.hash, {"steps": 20})
    return tok, prior_mod.load_prior(path)
