"""Rate-aware encoding (rdo.py): lambda 0 is plain rounding, each greedy choice minimises its own
objective, prefixes are the shorter encodings, and the files are ordinary coded token files."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tokctl.cli import app
from tokctl.errors import UserError
from tokctl.imagetok import prior as prior_mod
from tokctl.imagetok import rdo
from tokctl.imagetok.codec import PriorLookup, encode_images, rate_aware_file, read_token_bytes
from tokctl.imagetok.data import to_image
from tests.imagetok.conftest import make_tiny


def choose(model, prior_model, images, n, lam):
    """rdo.choose_ids on the encoder's own latents: the chosen ids (the nearest are checked
    in the first test)."""
    return rdo.choose_ids(model, prior_model, model.encode_latents(images), n, lam)[1]


def test_lambda_zero_gives_the_tokenizers_own_ids(tiny_prior, images):
    tok, prior = tiny_prior
    direct = tok.model.encode(images).numpy()
    near, chosen = rdo.choose_ids(tok.model, prior.model, tok.model.encode_latents(images), 6, 0.0)
    assert np.array_equal(near, direct) and np.array_equal(chosen, direct)
    near, _ = rdo.choose_ids(tok.model, prior.model, tok.model.encode_latents(images), 6, 0.3)
    assert np.array_equal(near, direct)
    # the candidate machinery's nearest point is the quantiser's code
    ids, dist = rdo.candidates(tok.model.quantizer, tok.model.encode_latents(images))
    assert np.array_equal(ids[..., 0], direct) and (dist.argmin(-1) == 0).all()


@pytest.mark.parametrize("lam,mixer", [(0.3, "attention"), (2.0, "attention"), (0.3, "linear")])
def test_each_choice_minimises_its_objective_given_the_prefix(tiny_prior, images, lam, mixer):
    tok, prior = tiny_prior
    # the linear mixer has a token metric (weighted distances); the prior only needs its vocab
    model = tok.model if mixer == "attention" else make_tiny("onedpiece", mixer="linear")[0]
    chosen = choose(model, prior.model, images, 6, lam)
    ids, dist = rdo.candidates(model.quantizer, model.encode_latents(images),
                               model.token_metric())
    assert (chosen != ids[..., 0]).any()  # the rate term did move some tokens off the nearest
    probs = prior.model.coding_probabilities(chosen, 6)  # the coder's own, given the chosen prefix
    for b in range(len(images)):
        for i in range(6):
            cost = dist[b, i] + lam * -np.log2(probs[b, i, ids[b, i]])
            mine = list(ids[b, i]).index(chosen[b, i])
            assert cost[mine] <= cost.min() + 1e-12
    # every chosen id is within one level of the nearest code in each dimension
    levels = model.quantizer.levels_list
    for a, c in zip(ids[..., 0].ravel(), chosen.ravel()):
        da = [(a // int(np.prod(levels[:k]))) % lv for k, lv in enumerate(levels)]
        dc = [(c // int(np.prod(levels[:k]))) % lv for k, lv in enumerate(levels)]
        assert max(abs(x - y) for x, y in zip(da, dc)) <= 1


def test_a_large_lambda_saves_bits_and_prefixes_are_shorter_encodings(tiny_prior, images):
    tok, prior = tiny_prior
    nearest = tok.model.encode(images).numpy()
    greedy = choose(tok.model, prior.model, images, 6, 100.0)
    bits = {k: prior_mod.ideal_bits(prior.model, v).sum()
            for k, v in {"nearest": nearest, "greedy": greedy}.items()}
    # with rate all but alone in the objective, the greedy ids cost fewer bits in total
    assert bits["greedy"] < bits["nearest"]
    for n in (1, 3, 5):  # choices never look ahead: n tokens are the first n of 6
        assert np.array_equal(choose(tok.model, prior.model, images, n, 100.0),
                              greedy[:, :n])


def test_rate_aware_files_round_trip_and_are_deterministic(tiny_prior, images):
    tok, prior = tiny_prior
    pil = [to_image(x) for x in images]
    blobs = encode_images(tok, pil, 6, prior, rate_lambda=0.3)
    assert blobs != encode_images(tok, pil, 6, prior)
    assert blobs == encode_images(tok, pil, 6, prior, rate_lambda=0.3)
    assert encode_images(tok, pil, 6, prior, rate_lambda=0.0) == encode_images(tok, pil, 6, prior)
    chosen = choose(tok.model, prior.model, images, 6, 0.3)
    nearest = tok.model.encode(images).numpy()
    lookup = PriorLookup(prior.path)
    for blob, row, near in zip(blobs, chosen, nearest):
        tf = read_token_bytes(tok, blob, lookup)
        # a coded file holds the rate-aware ids; one that came out plain (no bytes to save)
        # holds the nearest ids
        assert np.array_equal(tf.tokens[0], row if tf.prior_hash is not None else near)
    # three tokens a tile: 3 plain bytes, fewer than the prior's 3 header bytes and any payload,
    # so the file stays plain, and other ids than the nearest would only cost distortion
    near = np.ascontiguousarray(nearest[:1, :3])
    other = near.copy()
    other[0, 1] = (other[0, 1] + 1) % 64
    blob, held = rate_aware_file(tok, prior, 32, 32, near, other)
    assert held is near and blob == encode_images(tok, pil[:1], 3)[0]


def test_bad_lambdas_and_combinations_are_one_line_errors(tiny_prior, tmp_path):
    tok, prior = tiny_prior
    for bad in (-0.1, float("nan"), "x"):
        with pytest.raises(UserError):
            rdo.check_rate_lambda(bad)
    with pytest.raises(UserError, match="prior"):
        rdo.check_rate_aware(tok.model, None, 0.1)
    from PIL import Image
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(img)
    runner = CliRunner()
    base = ["tokenize-image", "encode", str(img), "--out", str(tmp_path / "o"),
            "--tokenizer", str(tok.path)]
    res = runner.invoke(app, base + ["--rate-lambda", "-1"])
    assert res.exit_code == 2 and "--rate-lambda=-1" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, base + ["--rate-lambda", "0.1", "--raw"])
    assert res.exit_code == 2 and "--raw" in res.output
    res = runner.invoke(app, base + ["--rate-lambda", "0.1", "--prior", str(prior.path)])
    assert res.exit_code == 0, res.output
    assert np.array_equal(
        read_token_bytes(tok, (tmp_path / "o" / "a.tok").read_bytes(), PriorLookup(prior.path)).tokens,
        choose(tok.model, prior.model,
                       torch.tensor(np.asarray(Image.open(img)), dtype=torch.float32)
                       .permute(2, 0, 1)[None] / 255, 6, 0.1))


def test_the_linear_mixers_metric_is_the_change_of_the_decoders_grid():
    """token_metric: moving token i by d moves the linear mixer's grid by d^T G_i d (one scale
    for every token and direction), and the candidates' distances are weighted by it."""
    model, _ = make_tiny("onedpiece", mixer="linear")
    g = model.token_metric()
    assert g.shape == (6, 3, 3)
    torch.manual_seed(0)
    x = torch.rand(1, 6, 3) * 2 - 1
    keep = torch.tensor([6])
    with torch.no_grad():
        base = model.decode_grid(x, keep)
        ratios = []
        for i in range(6):
            d = torch.randn(3) * 0.1
            moved = x.clone()
            moved[0, i] += d
            change = (model.decode_grid(moved, keep) - base).pow(2).sum().double()
            ratios.append(float(change / (d.double() @ g[i] @ d.double())))
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-4)
    lat = model.encode_latents(torch.rand(2, 3, 32, 32))
    _, plain = rdo.candidates(model.quantizer, lat)
    _, weighted = rdo.candidates(model.quantizer, lat, g)
    assert weighted.shape == plain.shape and not np.allclose(plain, weighted)
    assert make_tiny("onedpiece")[0].token_metric() is None  # attention mixer: latent distance
