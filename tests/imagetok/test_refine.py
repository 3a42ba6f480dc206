"""Encode-time refinement of the latents (refine.py): never worse than the encoder's codes by its
objective, only the kept latents move, the model and its usage counts are left as they were, and
refined files are ordinary token files, deterministic, coded or not, rate-aware or not."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tokctl.cli import app
from tokctl.errors import UserError
from tokctl.imagetok import refine
from tokctl.imagetok.codec import PriorLookup, decode_files, encode_images, read_token_bytes
from tokctl.imagetok.data import to_image, to_tensor
from tests.imagetok.conftest import make_tiny


def _objective_of_codes(model, latents, images, keep):
    keep_t = torch.full((len(images),), keep, dtype=torch.long)
    with torch.no_grad():
        return refine.objective(model.decode_latents(model.quantizer(latents).values, keep_t),
                                images)


@pytest.mark.parametrize("kind,quantizer", [("onedpiece", "fsq"), ("vq2d", "fsq"),
                                            ("titok", "vq")])
def test_refined_codes_are_never_worse_and_only_the_kept_latents_move(kind, quantizer, images):
    model, _ = make_tiny(kind, quantizer)
    keep = model.num_latents if kind == "vq2d" else 4
    with torch.no_grad():
        latents = model.encode_latents(images)
    before = _objective_of_codes(model, latents, images, keep)
    refined = refine.refine_latents(model, images, latents, keep, steps=15, lr=0.1)
    after = _objective_of_codes(model, refined, images, keep)
    assert (after <= before + 1e-6).all()          # each image keeps its best iterate
    assert (after < before - 1e-4).any()           # and the steps did find better codes
    assert torch.equal(refined[:, keep:], latents[:, keep:])
    assert refine.refine_latents(model, images, latents, keep, steps=0) is latents


def test_refinement_leaves_the_model_and_its_usage_counts_alone(images):
    model, _ = make_tiny("onedpiece", "fsq")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.quantizer.reset_usage()
    model.encode(images)
    usage = model.quantizer.usage()
    with torch.no_grad():
        refine.refine_latents(model, images, model.encode_latents(images), 6, steps=5)
    assert model.quantizer.usage() == usage
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_refined_files_decode_deterministically_and_round_trip_coded(tiny_prior, images):
    tok, prior = tiny_prior
    pil = [to_image(x) for x in images]
    plain = encode_images(tok, pil, 6)
    refined = encode_images(tok, pil, 6, refine_steps=8)
    assert refined == encode_images(tok, pil, 6, refine_steps=8)
    assert refined != plain

    def err(blobs):  # the decoded images' mean objective against the originals
        files = [read_token_bytes(tok, b) for b in blobs]
        recon = torch.stack([to_tensor(im) for im in decode_files(tok, files)])
        return float(refine.objective(recon, torch.stack([to_tensor(im) for im in pil])).mean())

    assert err(refined) < err(plain)
    lookup = PriorLookup(prior.path)
    for lam in (0.0, 0.3):  # coded, and rate-aware on the refined latents
        coded = encode_images(tok, pil, 6, prior, lam, refine_steps=8)
        for blob in coded:
            tf = read_token_bytes(tok, blob, lookup)
            assert tf.tokens.shape == (1, 6)
    # with rate 0 the coded files hold the same ids as the plain refined ones
    for a, b in zip(encode_images(tok, pil, 6, prior, 0.0, refine_steps=8), refined):
        assert np.array_equal(read_token_bytes(tok, a, lookup).tokens,
                              read_token_bytes(tok, b).tokens)


def test_coded_bits_are_the_priors_and_the_surrogate_is_continuous(tiny_prior, images):
    from tokctl.imagetok import prior as prior_mod

    tok, prior = tiny_prior
    model, q = tok.model, tok.model.quantizer
    with torch.no_grad():
        latents = model.encode_latents(images)
        bits, surrogate = refine.coded_bits(q, prior.model, latents)
        ids = model.encode(images).numpy()
        ideal = prior_mod.ideal_bits(prior.model, ids).sum(1)
        assert torch.allclose(bits.double(), torch.from_numpy(ideal), atol=0.05)
        # at a lattice point the surrogate is the bits of its id
        on_lattice = torch.atanh((q.bounded(latents).round() + 0.5) / ((q.levels - 1) * 1.001 / 2)
                                 ) - torch.atanh(0.5 / ((q.levels - 1) * 1.001 / 2))
        exact, at_point = refine.coded_bits(q, prior.model, on_lattice)
        assert torch.allclose(exact, at_point, atol=1e-3)
        # either side of a rounding edge gives one value (the last latent's first dimension:
        # no later id's context changes with it)
        b = q.bounded(latents)
        edge = b[0, -1, 0].floor() + 0.5

        def at(level):
            z = latents.clone()
            half = (q.levels[0] - 1) * 1.001 / 2
            z[0, -1, 0] = torch.atanh((level + 0.5) / half) - torch.atanh(0.5 / half)
            return refine.coded_bits(q, prior.model, z)[1][0]

        assert abs(float(at(edge - 1e-4) - at(edge + 1e-4))) < 1e-2


def test_a_rate_term_trades_distortion_for_fewer_coded_bits(tiny_prior, images):
    tok, prior = tiny_prior
    model = tok.model
    with torch.no_grad():
        latents = model.encode_latents(images)

    def bits_and_objective(z, rate):
        bits, _ = refine.coded_bits(model.quantizer, prior.model, z)
        return bits, _objective_of_codes(model, z, images, 6) + rate * bits / 6

    plain = refine.refine_latents(model, images, latents, 6, steps=15, prior=prior.model)
    cheap = refine.refine_latents(model, images, latents, 6, steps=15, prior=prior.model,
                                  rate=0.5)
    start_bits, start = bits_and_objective(latents, 0.5)
    cheap_bits, cheap_obj = bits_and_objective(cheap, 0.5)
    assert (cheap_obj <= start + 1e-6).all()               # never worse than the encoder's
    assert cheap_bits.sum() < bits_and_objective(plain, 0.5)[0].sum()


def test_bad_step_counts_are_one_line_errors(tiny_tokenizer_file, tmp_path):
    for bad in (-1, 2.5, "x", None):
        with pytest.raises(UserError, match="whole number"):
            refine.check_refine_steps(bad)
    assert refine.check_refine_steps("40") == 40
    from PIL import Image
    img = tmp_path / "a.png"
    Image.new("RGB", (48, 40), (10, 200, 30)).save(img)  # 4 tiles of the tiny 32x32
    path, _ = tiny_tokenizer_file
    base = ["tokenize-image", "encode", str(img), "--out", str(tmp_path / "o"), "--tokenizer",
            str(path), "--raw"]
    res = CliRunner().invoke(app, base + ["--refine", "-3"])
    assert res.exit_code == 2 and "--refine=-3" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, base + ["--refine-rate", "0.1"])
    assert res.exit_code == 2 and "--raw" in res.output
    res = CliRunner().invoke(app, base[:-1] + ["--refine-rate", "0.1"])
    assert res.exit_code == 2 and "refinement steps" in res.output
    res = CliRunner().invoke(app, base + ["--refine", "4"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["tokenize-image", "decode", str(tmp_path / "o" / "a.tok"),
                                   "--out", str(tmp_path / "png"), "--tokenizer", str(path)])
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "png" / "a.png").size == (48, 40)
