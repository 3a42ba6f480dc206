"""Loading TiTok as bytedance/1d-tokenizer releases it (config.json + model.safetensors).

The test writes its own release: the parameter names and shapes below are spelled out from
the released architecture (ViT encoder/decoder with a class token, MultiheadAttention blocks,
1x1-conv heads, the MaskGIT-VQGAN pixel decoder), independently of tokctl's module, with
shrunken widths so it stays small.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

import tokctl.imagetok.titok_release as release
from tokctl.errors import UserError
from tokctl.imagetok.checkpoint import load_tokenizer


def vit_shapes(prefix, width, layers, grid, latents):
    s = {f"{prefix}.class_embedding": (1, width),
         f"{prefix}.positional_embedding": (grid * grid + 1, width),
         f"{prefix}.latent_token_positional_embedding": (latents, width),
         f"{prefix}.ln_pre.weight": (width,), f"{prefix}.ln_pre.bias": (width,),
         f"{prefix}.ln_post.weight": (width,), f"{prefix}.ln_post.bias": (width,)}
    for i in range(layers):
        b = f"{prefix}.transformer.{i}"
        s.update({f"{b}.ln_1.weight": (width,), f"{b}.ln_1.bias": (width,),
                  f"{b}.attn.in_proj_weight": (3 * width, width), f"{b}.attn.in_proj_bias": (3 * width,),
                  f"{b}.attn.out_proj.weight": (width, width), f"{b}.attn.out_proj.bias": (width,),
                  f"{b}.ln_2.weight": (width,), f"{b}.ln_2.bias": (width,),
                  f"{b}.mlp.c_fc.weight": (4 * width, width), f"{b}.mlp.c_fc.bias": (4 * width,),
                  f"{b}.mlp.c_proj.weight": (width, 4 * width), f"{b}.mlp.c_proj.bias": (width,)})
    return s


def resnet(prefix, cin, cout):
    s = {f"{prefix}.norm1.weight": (cin,), f"{prefix}.norm1.bias": (cin,),
         f"{prefix}.conv1.weight": (cout, cin, 3, 3),
         f"{prefix}.norm2.weight": (cout,), f"{prefix}.norm2.bias": (cout,),
         f"{prefix}.conv2.weight": (cout, cout, 3, 3)}
    if cin != cout:
        s[f"{prefix}.nin_shortcut.weight"] = (cout, cout, 1, 1)
    return s


def release_shapes(config, sizes, pixel):
    vq = config["model"]["vq_model"]
    image = config["dataset"]["preprocessing"]["crop_size"]
    ew, el, _ = sizes[vq["vit_enc_model_size"]]
    dw, dl, _ = sizes[vq["vit_dec_model_size"]]
    pe, pd, n, c = vq["vit_enc_patch_size"], vq["vit_dec_patch_size"], vq["num_latent_tokens"], vq["token_size"]
    s = {"latent_tokens": (n, ew), "quantize.embedding.weight": (vq["codebook_size"], c),
         "encoder.patch_embed.weight": (ew, 3, pe, pe), "encoder.patch_embed.bias": (ew,),
         "encoder.conv_out.weight": (c, ew, 1, 1), "encoder.conv_out.bias": (c,),
         "decoder.decoder_embed.weight": (dw, c), "decoder.decoder_embed.bias": (dw,),
         "decoder.mask_token": (1, 1, dw),
         "decoder.ffn.0.weight": (2 * dw, dw, 1, 1), "decoder.ffn.0.bias": (2 * dw,),
         "decoder.ffn.2.weight": (pixel["codes"], 2 * dw, 1, 1), "decoder.ffn.2.bias": (pixel["codes"],),
         "pixel_quantize.embedding.weight": (pixel["codes"], pixel["z_channels"])}
    s.update(vit_shapes("encoder", ew, el, image // pe, n))
    s.update(vit_shapes("decoder", dw, dl, image // pd, n))
    h, mult, nres = pixel["hidden_channels"], pixel["channel_mult"], pixel["num_res_blocks"]
    top = h * mult[-1]
    p = "pixel_decoder"
    s.update({f"{p}.conv_in.weight": (top, pixel["z_channels"], 3, 3), f"{p}.conv_in.bias": (top,),
              f"{p}.norm_out.weight": (h * mult[0],), f"{p}.norm_out.bias": (h * mult[0],),
              f"{p}.conv_out.weight": (3, h * mult[0], 3, 3), f"{p}.conv_out.bias": (3,)})
    for j in range(nres):
        s.update(resnet(f"{p}.mid.{j}", top, top))
    for i in range(len(mult)):
        cin = h * (mult[-1] if i == len(mult) - 1 else mult[i + 1])
        for j in range(nres):
            s.update(resnet(f"{p}.up.{i}.block.{j}", cin if j == 0 else h * mult[i], h * mult[i]))
        if i != 0:
            s.update({f"{p}.up.{i}.upsample_conv.weight": (h * mult[i], h * mult[i], 3, 3),
                      f"{p}.up.{i}.upsample_conv.bias": (h * mult[i],)})
    return s


CONFIG = {"experiment": {"tokenizer_checkpoint": "tokenizer_titok_l32.bin"},
          "model": {"vq_model": {"codebook_size": 64, "token_size": 12, "use_l2_norm": True,
                                 "commitment_cost": 0.25, "vit_enc_model_size": "small",
                                 "vit_dec_model_size": "small", "vit_enc_patch_size": 16,
                                 "vit_dec_patch_size": 16, "num_latent_tokens": 8,
                                 "finetune_decoder": True}},
          "dataset": {"preprocessing": {"crop_size": 64}}}
TINY_SIZES = {"small": (32, 2, 2)}
TINY_PIXEL = {"hidden_channels": 32, "channel_mult": (1, 1, 1, 1, 2), "num_res_blocks": 1,
              "z_channels": 32, "codes": 16}


def write_release(folder, config=CONFIG):
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    shapes = release_shapes(config, TINY_SIZES, TINY_PIXEL)
    save_file({k: 0.05 * torch.randn(v, generator=g) for k, v in shapes.items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return shapes


@pytest.fixture
def tiny_release_sizes(monkeypatch):
    monkeypatch.setattr(release, "VIT_SIZES", TINY_SIZES)
    monkeypatch.setattr(release, "PIXEL_DECODER", TINY_PIXEL)


def test_release_folder_loads_strictly_and_tokenizes(tmp_path, tiny_release_sizes):
    shapes = write_release(tmp_path / "titok")
    tok = load_tokenizer(tmp_path / "titok")
    own = {("quantize.embedding.weight" if k == "quantizer.codebook" else k): tuple(v.shape)
           for k, v in tok.model.state_dict().items() if not k.startswith("quantizer.")
           or k == "quantizer.codebook"}
    assert own == {k: tuple(v) for k, v in shapes.items()}
    images = torch.rand(2, 3, 64, 64)
    tokens = tok.model.encode(images)
    assert tokens.shape == (2, 8) and tokens.max() < 64
    # l2-normalised VQ: the chosen code is the most similar direction
    z = torch.nn.functional.normalize(tok.model.encode_latents(images), dim=-1)
    codes = torch.nn.functional.normalize(tok.model.quantizer.codebook, dim=-1)
    assert torch.equal(tokens, (z @ codes.t()).argmax(-1))
    out = tok.model.decode(tokens)
    assert out.shape == (2, 3, 64, 64)


def test_non_legacy_release_predicts_pixels(tmp_path, tiny_release_sizes):
    config = json.loads(json.dumps(CONFIG))
    config["model"]["vq_model"].update(is_legacy=False, finetune_decoder=False)
    model = release.ReleaseTiTok(config)
    assert not hasattr(model, "pixel_decoder")
    assert model.decoder.ffn[0].out_channels == 16 * 16 * 3
    assert model.decode(model.encode(torch.rand(1, 3, 64, 64))).shape == (1, 3, 64, 64)


@pytest.mark.parametrize("size,patch,latents,width,layers", [
    ("large", 16, 32, 1024, 24), ("base", 16, 64, 768, 12), ("small", 16, 128, 512, 8)])
def test_published_sizes_build_with_released_shapes(size, patch, latents, width, layers):
    """TiTok-L-32, B-64 and S-128 at 256 px: built on the meta device (no memory), every
    parameter name and shape as the release's."""
    config = json.loads(json.dumps(CONFIG))
    config["model"]["vq_model"].update(codebook_size=4096, vit_enc_model_size=size,
                                       vit_dec_model_size=size, num_latent_tokens=latents)
    config["dataset"]["preprocessing"]["crop_size"] = 256
    with torch.device("meta"):
        model = release.ReleaseTiTok(config)
    own = {("quantize.embedding.weight" if k == "quantizer.codebook" else k): tuple(v.shape)
           for k, v in model.state_dict().items()
           if not k.startswith("quantizer.") or k == "quantizer.codebook"}
    expected = release_shapes(config, release.VIT_SIZES, release.PIXEL_DECODER)
    assert own == {k: tuple(v) for k, v in expected.items()}
    assert own["encoder.positional_embedding"] == (257, width)
    assert sum(k.endswith("attn.in_proj_weight") for k in own) == 2 * layers


def test_mismatched_release_is_one_clear_error(tmp_path, tiny_release_sizes):
    write_release(tmp_path / "titok")
    config = json.loads(json.dumps(CONFIG))
    config["model"]["vq_model"]["num_latent_tokens"] = 9
    (tmp_path / "titok" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="do not match"):
        load_tokenizer(tmp_path / "titok")
