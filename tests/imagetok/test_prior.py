"""The token prior: arithmetic-coded token files (exact round trips, every prefix, the prior
named in the header), tiles of images of any size, and `prior train` end to end (tiny)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tokctl.cli import app
from tokctl.config import compose
from tokctl.imagetok import prior as prior_mod
from tokctl.imagetok import tokfile
from tokctl.imagetok.checkpoint import load_tokenizer
from tokctl.imagetok.codec import (PriorLookup, assemble, decode_files, encode_images,
                                   image_tiles, read_token_bytes)
from tokctl.jobs import JOBS, execute


def _photo(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((5, 7, 3)) * 255).astype(np.uint8)).resize((w, h),
                                                                                Image.BICUBIC)


def test_coded_file_round_trip_every_prefix(tiny_prior):
    tok, prior = tiny_prior
    im = _photo(70, 40)  # 3 x 2 tiles of 32
    plain = read_token_bytes(tok, encode_images(tok, [im], 6)[0]).tokens
    assert plain.shape == (6, 6)
    lookup = PriorLookup(prior.path)
    for n in range(1, 7):
        ids = np.ascontiguousarray(plain[:, :n])
        coded = tokfile.dumps(tokfile.TokenFile(1, tok.hash, 70, 40, ids, prior.hash), 64,
                              prior_mod.encode_ids(prior.model, ids))
        head, _, _ = tokfile.read_header(coded)
        assert head.prior_hash == prior.hash and (head.width, head.height) == (70, 40)
        tf = read_token_bytes(tok, coded, lookup)
        assert np.array_equal(tf.tokens, ids)
        # encode(decode(file)) of the same ids is byte-identical
        again = tokfile.TokenFile(tf.kind, tok.hash, 70, 40, tf.tokens, prior.hash)
        assert tokfile.dumps(again, 64, prior_mod.encode_ids(prior.model, tf.tokens)) == coded
        # encode writes whichever is smaller, coded or plain, and it reads back the same
        blob = encode_images(tok, [im], n, prior)[0]
        plain_size = len(encode_images(tok, [im], n)[0])
        assert len(blob) == min(len(coded), plain_size)
        assert np.array_equal(read_token_bytes(tok, blob, lookup).tokens, ids)
    assert encode_images(tok, [im], 6, prior) == encode_images(tok, [im], 6, prior)


def test_coding_saves_bits_on_what_the_prior_learnt(tiny_prior):
    tok, prior = tiny_prior
    ids = tok.model.encode(torch.rand(8, 3, 32, 32)).numpy()
    coded = prior_mod.encode_ids(prior.model, ids)
    ideal = prior_mod.ideal_bits(prior.model, ids).sum() / 8
    assert ideal < ids.size * 6 / 8  # below 6 raw bits a token
    assert len(coded) <= ideal + 8  # the range coder's overhead: a few bytes a stream
    assert np.array_equal(prior_mod.decode_ids(prior.model, coded, 8, 6), ids)


def test_streams_are_cut_to_the_shortest_that_decodes(tiny_prior):
    """The coder's sealed stream (whole 32-bit words) is cut while it still decodes: within two
    bytes of the ideal, and one byte fewer no longer decodes."""
    tok, prior = tiny_prior
    rng = np.random.default_rng(0)
    for t in range(1, 6):
        ids = rng.integers(0, 64, (t, 6))
        coded = prior_mod.encode_ids(prior.model, ids)
        assert len(coded) <= prior_mod.ideal_bits(prior.model, ids).sum() / 8 + 2
        assert np.array_equal(prior_mod.decode_ids(prior.model, coded, t, 6), ids)
        assert not np.array_equal(prior_mod.decode_ids(prior.model, coded[:-1], t, 6), ids)


def test_a_file_whose_prior_is_missing_is_refused(tiny_prior):
    tok, prior = tiny_prior
    ids = tok.model.encode(torch.rand(1, 3, 32, 32)).numpy()
    blob = tokfile.dumps(tokfile.TokenFile(1, tok.hash, 32, 32, ids, prior.hash), 64,
                         prior_mod.encode_ids(prior.model, ids))
    with pytest.raises(tokfile.TokenFileError, match=f"token prior {prior.hash:06x}, which"):
        read_token_bytes(tok, blob, PriorLookup(None))


def test_tiles_reassemble_exactly():
    im = _photo(70, 45, seed=3)
    tiles = image_tiles(im, 32)
    assert tiles.shape == (6, 3, 32, 32)
    assert np.array_equal(np.asarray(assemble(tiles, 70, 45)), np.asarray(im))


def test_cli_coded_files_and_side_by_side(tiny_prior, tmp_path):
    tok, prior = tiny_prior
    runner = CliRunner()
    (tmp_path / "in").mkdir()
    _photo(50, 30).save(tmp_path / "in" / "a.png")
    # a coded file, as encode writes when coding makes it smaller
    ids = read_token_bytes(tok, encode_images(tok, [_photo(50, 30)], 6)[0]).tokens
    (tmp_path / "tok").mkdir()
    tok_file = tmp_path / "tok" / "a.tok"
    tok_file.write_bytes(tokfile.dumps(tokfile.TokenFile(1, tok.hash, 50, 30, ids, prior.hash),
                                       64, prior_mod.encode_ids(prior.model, ids)))
    res = runner.invoke(app, ["tokenize-image", "decode", str(tok_file), "--out",
                              str(tmp_path / "x"), "--tokenizer", str(tok.path)])
    assert res.exit_code == 1 and "--prior" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["tokenize-image", "decode", str(tok_file), "--out",
                              str(tmp_path / "png"), "--tokenizer", str(tok.path), "--prior",
                              str(prior.path), "--side-by-side", str(tmp_path / "in")])
    assert res.exit_code == 0, res.output
    pair = Image.open(tmp_path / "png" / "a.png")
    assert pair.size == (2 * 50 + 4, 30)
    assert np.array_equal(np.asarray(pair)[:, :50], np.asarray(Image.open(tmp_path / "in" / "a.png")))


def test_prior_train_job_resumes(tiny_tokenizer_file, photo_folder, tmp_path):
    job = JOBS["tokenize-image prior train"]
    base = [f"tokenizer_path={tiny_tokenizer_file[0]}", f"data.folders=[{photo_folder}]",
            "data.crops=24", "data.val_crops=8", "prior.width=16", "prior.layers=1",
            "prior.heads=2", "train.batch_size=8", "train.log_every=1", "train.val_every=2",
            "train.checkpoint_every=2", "train.lr_warmup_steps=1", "threads=1"]
    status, path = execute(job, compose(job.conf, job.config_name, base + ["train.steps=4"]),
                           tmp_path / "run1")
    assert status == "completed"
    m = json.loads((path / "metrics.json").read_text())
    assert m["steps"] == 4 and m["train_crops"] == 24 and m["raw_bits_per_token"] == 6
    prior = prior_mod.load_prior(path / "prior.pt")
    assert prior.tokenizer_hash == load_tokenizer(tiny_tokenizer_file[0]).hash
    status, path2 = execute(job, compose(job.conf, job.config_name,
                                         base + ["train.steps=6", f"resume={path}"]),
                            tmp_path / "run2")
    assert status == "completed"
    steps = [json.loads(l)["step"] for l in (path2 / "samples.jsonl").read_text().splitlines()]
    assert steps == [5, 6]
