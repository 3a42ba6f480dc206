import pytest
import torch

from tests.imagetok.conftest import make_tiny
from tokctl.errors import UserError


@pytest.mark.parametrize("kind", ["titok", "onedpiece", "flexnested", "vq2d"])
@pytest.mark.parametrize("quantizer", ["fsq", "vq", "rvq"])
def test_train_step_and_token_shapes(kind, quantizer, images):
    check_train_step_and_tokens(make_tiny(kind, quantizer)[0], images)


@pytest.mark.parametrize("kind", ["titok", "onedpiece", "flexnested"])
@pytest.mark.parametrize("quantizer", ["fsq", "vq", "rvq"])
def test_linear_mixer_train_step_and_token_shapes(kind, quantizer, images):
    model, _ = make_tiny(kind, quantizer, mixer="linear")
    assert not hasattr(model, "encoder") and not hasattr(model, "decoder")
    check_train_step_and_tokens(model, images)


def check_train_step_and_tokens(model, images):
    model.train()
    recon, q = model(images, quantize=False)  # autoencoder warm-up
    assert q is None and recon.shape == images.shape
    recon, q = model(images)
    loss = (recon - images).abs().mean() + q.loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters()
               if p.requires_grad and "dropped_token" not in n and "mask_token" not in n)
    model.eval()
    tokens = model.encode(images)
    assert tokens.shape == (5, model.max_tokens)
    assert tokens.min() >= 0 and tokens.max() < model.codebook_size
    out = model.decode(tokens)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("mixer", ["attention", "linear"])
@pytest.mark.parametrize("kind", ["onedpiece", "flexnested"])
def test_variable_length_decodes_any_prefix(kind, mixer, images):
    model, _ = make_tiny(kind, "fsq", mixer=mixer)
    tokens = model.encode(images)
    outs = [model.decode(tokens[:, :n]) for n in range(1, model.max_tokens + 1)]
    assert all(o.shape == images.shape for o in outs)
    # a prefix decodes independently of what follows it
    other = tokens.clone()
    other[:, 3:] = (other[:, 3:] + 1) % model.codebook_size
    torch.testing.assert_close(model.decode(other[:, :3]), outs[2])
    assert not torch.allclose(model.decode(other), outs[-1])  # and the tail is read when kept


def test_tail_drop_and_nested_keep_counts():
    onedpiece, _ = make_tiny("onedpiece", "fsq", num_latents=8)
    keep = onedpiece.training_keep(4000, "cpu")
    assert keep.min() == 1 and keep.max() == 8 and len(keep.unique()) == 8
    flex, _ = make_tiny("flexnested", "fsq", num_latents=8)
    assert set(flex.training_keep(4000, "cpu").tolist()) == {1, 2, 4, 8}
    titok, _ = make_tiny("titok", "fsq")
    assert (titok.training_keep(10, "cpu") == titok.num_latents).all()


def test_flexnested_registers_are_causal(images):
    model, _ = make_tiny("flexnested", "fsq")
    z = model.encode_latents(images)
    # changing what register 3 would see later cannot change registers 0..2: perturb the
    # learned register token 4 and compare
    with torch.no_grad():
        model.latent_tokens[0, 4:] += 1.0
    z2 = model.encode_latents(images)
    torch.testing.assert_close(z[:, :4], z2[:, :4])
    assert not torch.allclose(z[:, 4:], z2[:, 4:])


def test_patch_stem_is_the_pure_vit(images):
    model, _ = make_tiny("titok", "fsq", stem="patch")
    assert model.decode(model.encode(images)).shape == images.shape


def test_bad_shapes_are_rejected():
    with pytest.raises(UserError, match="patch_size must be 8"):
        make_tiny("titok", "fsq", patch_size=16)  # 3 conv stages halve to patch 8 only
    model, _ = make_tiny("onedpiece", "fsq")
    with pytest.raises(ValueError):
        model.decode(torch.zeros(1, model.max_tokens + 1, dtype=torch.long))
    with pytest.raises(UserError, match="mixer must be"):
        make_tiny("onedpiece", "fsq", mixer="mlp")


def test_ms_ssim_matches_the_reference_at_five_scales(monkeypatch):
    from pytorch_msssim import ms_ssim

    import tokctl.imagetok.losses as losses

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 200, 200, generator=g)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    monkeypatch.setattr(losses, "MS_SSIM_WEIGHTS", (0.0448, 0.2856, 0.3001, 0.2363, 0.1333))
    monkeypatch.setattr(losses, "MS_SSIM_WIN", 11)
    torch.testing.assert_close(losses.ms_ssim_per_image(x, y),
                               ms_ssim(x, y, data_range=1.0, size_average=False),
                               rtol=1e-4, atol=1e-4)


def test_linear_shortcut_keeps_prefix_independence(images):
    model, _ = make_tiny("onedpiece", "fsq", shortcut=4)
    tokens = model.encode(images)
    other = tokens.clone()
    other[:, 2:] = (other[:, 2:] + 1) % model.codebook_size
    torch.testing.assert_close(model.decode(other[:, :2]), model.decode(tokens[:, :2]))
    assert not torch.allclose(model.decode(other), model.decode(tokens))
