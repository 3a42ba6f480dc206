"""The prior over FSQ digits (digit_prior.py): causal in coding order, lossless coding whose
probabilities are the teacher-forced ones, refinement's rate term under it, `prior train
prior.kind=digits` end to end into coded files, and the one-line errors around it."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tokctl.cli import app
from tokctl.errors import UserError
from tokctl.imagetok import prior as prior_mod
from tokctl.imagetok import refine, tokfile
from tokctl.imagetok.checkpoint import load_tokenizer, save_tokenizer
from tokctl.imagetok.codec import PriorLookup, encode_images, image_ids, read_token_bytes
from tokctl.imagetok.data import to_image
from tokctl.imagetok.digit_prior import DigitPrior
from tokctl.config import compose
from tokctl.jobs import JOBS, execute
from tests.imagetok.conftest import make_tiny


def _tiny_prior(levels=(4, 4, 3), grid=3) -> DigitPrior:
    torch.manual_seed(0)
    return DigitPrior(list(levels), grid, hidden=16).eval()


def test_each_digit_sees_only_digits_coded_before_it():
    prior = _tiny_prior()
    digits = prior.digits_of(torch.as_tensor(np.random.default_rng(0).integers(0, 48, (4, 9))))
    with torch.no_grad():
        before = prior(digits)[..., :3]  # levels every dimension has
        for cell, k in [(0, 0), (4, 1), (8, 2)]:
            changed = digits.clone()
            changed[:, cell, k] = (changed[:, cell, k] + 1) % 3
            moved = (prior(changed)[..., :3] - before).abs().amax((0, 3)).flatten()
            order = cell * 3 + k
            assert (moved[:order + 1] == 0).all()  # itself and every digit coded earlier
            if order + 1 < len(moved):
                assert moved[order + 1:].max() > 0  # some later digit reads it


@pytest.mark.parametrize("n", [9, 5])
def test_digits_code_losslessly_at_their_teacher_forced_probabilities(n):
    prior = _tiny_prior()
    ids = np.random.default_rng(1).integers(0, 48, (5, n))
    assert np.array_equal(prior.ids_of_symbols(prior.symbols(ids)), ids)
    data = prior_mod.encode_ids(prior, ids)
    assert np.array_equal(prior_mod.decode_ids(prior, data, 5, n), ids)
    assert len(data) <= prior_mod.ideal_bits(prior, ids).sum() / 8 + 2
    probs = prior.coding_probabilities(ids, n)
    with torch.no_grad():
        forced = torch.softmax(prior(prior.digits_of(torch.as_tensor(ids))).double(), -1)
    # the same distributions, up to the coder's rounding of the logits to 1/64
    assert np.abs(probs - forced.reshape(5, n * 3, -1).numpy()).max() < 0.01
    assert probs[:, 2::3, 3].max() == 0  # the third dimension has 3 levels: no fourth


def test_rate_term_under_a_digit_prior_is_exact_on_the_lattice(images):
    model, _ = make_tiny("vq2d", "fsq")
    q = model.quantizer
    prior = DigitPrior(q.levels_list, model.grid, hidden=16).eval()
    with torch.no_grad():
        latents = model.encode_latents(images)
    bits, surrogate = refine.coded_bits(q, prior, latents)
    ids = q(latents).ids[..., 0].numpy()
    assert torch.allclose(bits.double(), torch.from_numpy(prior_mod.ideal_bits(prior, ids).sum(1)),
                          atol=0.05)
    # on a lattice point (latents whose bounded values are whole levels) the surrogate is exact
    half = (q.levels - 1) * (1 + 1e-3) / 2                           # every level count is even
    on_lattice = (torch.atanh((q.bounded(latents).round() + 0.5) / half)
                  - torch.atanh(0.5 / half))
    exact, smooth = refine.coded_bits(q, prior, on_lattice)
    assert torch.allclose(exact, smooth, atol=1e-3)
    # refinement with the rate term runs and keeps the file's bits no higher than without it
    with torch.no_grad():
        free = refine.refine_latents(model, images, latents, model.num_latents, 10)
    paid = refine.refine_latents(model, images, latents, model.num_latents, 10, prior=prior,
                                 rate=1.0)
    assert refine.coded_bits(q, prior, paid)[0].sum() < refine.coded_bits(q, prior, free)[0].sum()


def test_prior_train_digits_codes_files_end_to_end(photo_folder, tmp_path):
    model, cfg = make_tiny("vq2d", "fsq")
    tok_path = tmp_path / "grid.pt"
    save_tokenizer(tok_path, model, cfg, {"steps": 0})
    job = JOBS["tokenize-image prior train"]
    over = [f"tokenizer_path={tok_path}", f"data.folders=[{photo_folder}]", "data.crops=16",
            "data.val_crops=4", "data.refine_steps=2", "prior.kind=digits", "prior.hidden=16",
            "train.steps=4", "train.batch_size=8", "train.log_every=2", "train.val_every=2",
            "train.checkpoint_every=2", "train.lr_warmup_steps=1", "threads=1"]
    status, run = execute(job, compose(job.conf, job.config_name, over), tmp_path / "run")
    assert status == "completed"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["raw_bits_per_token"] == 6 and metrics["val_bits_per_token"] > 0
    prior = prior_mod.load_prior(run / "prior.pt")
    assert prior.model.kind == "digits" and prior.config["levels"] == [4, 4, 4]
    tok = load_tokenizer(tok_path)
    pics = [to_image(x) for x in torch.rand(2, 3, 40, 70)]  # tiles of 32x32
    files = encode_images(tok, pics, 16, prior, refine_steps=3, refine_rate=0.01)
    assert files == encode_images(tok, pics, 16, prior, refine_steps=3, refine_rate=0.01)
    lookup = PriorLookup(run / "prior.pt")
    for blob in files:  # coded or plain, whichever is smaller: each decodes
        assert read_token_bytes(tok, blob, lookup).tokens.shape == (6, 16)
    ids = image_ids(tok, pics[:1], 16)[0][0]
    coded = tokfile.dumps(tokfile.TokenFile(3, tok.hash, 70, 40, ids, prior.hash),
                          tok.model.codebook_size, prior_mod.encode_ids(prior.model, ids))
    assert np.array_equal(read_token_bytes(tok, coded, lookup).tokens, ids)
    with pytest.raises(tokfile.TokenFileError, match="prior"):  # not without its prior
        read_token_bytes(tok, coded, PriorLookup(None))
    # the greedy rate-aware choice weighs ids: not under a digits prior, in one line
    res = CliRunner().invoke(app, ["tokenize-image", "encode", str(photo_folder / "p0.png"),
                                   "--out", str(tmp_path / "o"), "--tokenizer", str(tok_path),
                                   "--prior", str(run / "prior.pt"), "--rate-lambda", "0.1"])
    assert res.exit_code == 2 and "--refine-rate" in res.output
    assert "Traceback" not in res.output


def test_prior_kind_mismatches_are_one_line_errors(tiny_tokenizer_file, photo_folder, tmp_path):
    job = JOBS["tokenize-image prior train"]
    base = [f"data.folders=[{photo_folder}]", "data.crops=4", "data.val_crops=2", "threads=1"]
    with pytest.raises(UserError, match="2D grid"):  # a 1D tokenizer has no grid of digits
        execute(job, compose(job.conf, job.config_name, base + [
            f"tokenizer_path={tiny_tokenizer_file[0]}", "prior.kind=digits"]), tmp_path / "a")
    with pytest.raises(UserError, match="prior.kind=digits"):  # 2^32 ids: no softmax over them
        execute(job, compose(job.conf, job.config_name, base + ["tokenizer_path=vq2d32"]),
                tmp_path / "b")
