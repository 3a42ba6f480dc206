"""TiTok's two-stage recipe: 1D tokenizers around a trained 2D tokenizer (tokctl.imagetok.proxy)."""

import json

import pytest
import torch

from tests.imagetok.conftest import make_tiny, tiny_config, tiny_overrides
from tokctl.config import compose
from tokctl.errors import UserError
from tokctl.imagetok import proxy
from tokctl.imagetok.checkpoint import build_tokenizer, load_tokenizer, save_tokenizer
from tokctl.jobs import JOBS, execute


@pytest.fixture
def proxy_file(tmp_path):
    model, cfg = make_tiny("vq2d", "fsq", seed=1)
    path = tmp_path / "proxy.pt"
    save_tokenizer(path, model, cfg, {"steps": 0}, half=False)
    return path, model


def proxied(kind, proxy_path, **over):
    config, weights = proxy.resolve(tiny_config(kind, "fsq", proxy=str(proxy_path), **over))
    model = build_tokenizer(config)
    assert not model.load_state_dict(weights, strict=False).unexpected_keys
    return model, config


@pytest.mark.parametrize("tune", [False, True])
def test_the_proxy_is_frozen_except_its_decoder_when_tuned(proxy_file, images, tune):
    path, vq2d = proxy_file
    model, config = proxied("onedpiece", path, tune_proxy_decoder=tune)
    assert isinstance(config["proxy"], dict)  # the saved config rebuilds without the file
    for name, p in vq2d.state_dict().items():  # the proxy's trained weights were loaded
        torch.testing.assert_close(model.proxy.net.state_dict()[name], p)
    model.train()
    recon, q = model(images)
    aux = model.auxiliary_loss()
    assert recon.shape == images.shape and aux.item() > 0
    ((recon - images).abs().mean() + aux).backward()
    for name, p in model.named_parameters():
        frozen = name.startswith("proxy.net.")
        decoder = name.split(".")[2] in ("from_code", "decoder_pos", "decoder", "pixels") \
            if frozen else False
        if frozen and not (tune and decoder):
            assert p.grad is None, name
        elif "mask_token" not in name:
            assert p.grad is not None, name


def test_proxy_loss_targets_the_proxy_codes_of_the_same_images(proxy_file, images):
    path, vq2d = proxy_file
    model, _ = proxied("titok", path)
    model(images)
    with torch.no_grad():
        expected = vq2d.quantizer(vq2d.encode_latents(images)).values
    torch.testing.assert_close(model.proxy.target_codes, expected)
    torch.testing.assert_close(model.auxiliary_loss(),
                               torch.nn.functional.mse_loss(model.proxy.codes, expected))


@pytest.mark.parametrize("kind", ["onedpiece", "flexnested"])
@pytest.mark.parametrize("mixer", ["attention", "linear"])
def test_a_proxied_tokenizer_saves_loads_and_decodes_any_prefix(proxy_file, images, tmp_path, kind,
                                                                mixer):
    model, config = proxied(kind, proxy_file[0], mixer=mixer)
    model.eval()
    save_tokenizer(tmp_path / "t.pt", model, config, {"steps": 0}, half=False)
    proxy_file[0].unlink()  # the saved tokenizer needs the proxy file no more
    loaded = load_tokenizer(tmp_path / "t.pt").model
    tokens = model.encode(images)
    torch.testing.assert_close(loaded.encode(images), tokens)
    torch.testing.assert_close(loaded.decode(tokens[:, :3]), model.decode(tokens[:, :3]))
    other = tokens.clone()
    other[:, 3:] = (other[:, 3:] + 1) % model.codebook_size
    torch.testing.assert_close(loaded.decode(other[:, :3]), loaded.decode(tokens[:, :3]))
    assert not torch.allclose(loaded.decode(other), loaded.decode(tokens))


def test_a_proxy_that_is_not_a_matching_vq2d_is_one_clear_error(proxy_file, tmp_path):
    one_d, cfg = make_tiny("titok", "fsq")
    save_tokenizer(tmp_path / "titok.pt", one_d, cfg, {"steps": 0})
    with pytest.raises(UserError, match="must be a vq2d"):
        proxy.resolve(tiny_config("onedpiece", "fsq", proxy=str(tmp_path / "titok.pt")))
    with pytest.raises(UserError, match="tokenizer.image_size=32"):
        proxy.resolve(tiny_config("onedpiece", "fsq", proxy=str(proxy_file[0]), image_size=64))
    with pytest.raises(UserError, match="no such tokenizer file"):
        proxy.resolve(tiny_config("onedpiece", "fsq", proxy=str(tmp_path / "none.pt")))


def test_train_with_a_proxy_logs_its_loss_and_resumes(photo_folder, proxy_file, tmp_path):
    job = JOBS["tokenize-image train"]
    over = tiny_overrides(photo_folder) + [f"tokenizer.proxy={proxy_file[0]}"]
    status, path = execute(job, compose(job.conf, job.config_name, over), tmp_path / "run1")
    assert status == "completed"
    rows = [json.loads(l) for l in (path / "samples.jsonl").read_text().splitlines()]
    assert all(r["proxy"] > 0 for r in rows)
    frozen = proxy_file[1].state_dict()
    trained = load_tokenizer(path / "tokenizer.pt").model.proxy.net.state_dict()
    for name in ("stem.net.0.weight", "encoder.blocks.0.qkv.weight", "pixels.net.0.weight"):
        torch.testing.assert_close(trained[name], frozen[name].half().float())
    over2 = tiny_overrides(photo_folder, steps=6) + [f"resume={path}"]
    status, path2 = execute(job, compose(job.conf, job.config_name, over2), tmp_path / "run2")
    assert status == "completed"


def test_first_stage_trains_on_the_proxy_codes_alone(photo_folder, proxy_file, tmp_path):
    job = JOBS["tokenize-image train"]
    no_pixels = ["train.l1=0", "train.ssim=0"]
    over = tiny_overrides(photo_folder) + no_pixels + [f"tokenizer.proxy={proxy_file[0]}",
                                                       "tokenizer.mixer=linear"]
    status, path = execute(job, compose(job.conf, job.config_name, over), tmp_path / "run1")
    assert status == "completed"
    rows = [json.loads(l) for l in (path / "samples.jsonl").read_text().splitlines()]
    assert all(r["loss"] == pytest.approx(r["proxy"]) and "l1" not in r for r in rows)
    assert "ssim@6" in rows[-1]  # validation still decodes to pixels
    plain = tiny_overrides(photo_folder) + no_pixels
    with pytest.raises(UserError, match="tokenizer.proxy=vq2d"):
        execute(job, compose(job.conf, job.config_name, plain), tmp_path / "run2")


def test_second_stage_starts_from_the_first_and_tunes_the_proxy_decoder(photo_folder, proxy_file,
                                                                        tmp_path):
    job = JOBS["tokenize-image train"]
    over = tiny_overrides(photo_folder, steps=2) + [f"tokenizer.proxy={proxy_file[0]}"]
    status, first = execute(job, compose(job.conf, job.config_name, over), tmp_path / "run1")
    stage1 = load_tokenizer(first).model.state_dict()
    over2 = over + [f"init={first}", "tokenizer.tune_proxy_decoder=true", "train.steps=1",
                    "train.ae_warmup_steps=0"]
    status, second = execute(job, compose(job.conf, job.config_name, over2), tmp_path / "run2")
    assert status == "completed"
    stage2 = load_tokenizer(second).model.state_dict()
    assert torch.equal(stage2["proxy.net.stem.net.0.weight"], stage1["proxy.net.stem.net.0.weight"])
    assert not torch.equal(stage2["proxy.net.pixels.net.0.weight"],
                           stage1["proxy.net.pixels.net.0.weight"])
    with pytest.raises(UserError, match="do not fit"):
        execute(job, compose(job.conf, job.config_name, over2 + ["tokenizer.num_latents=5"]),
                tmp_path / "run3")
