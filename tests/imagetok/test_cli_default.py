"""End to end through the `tokctl` console script on the embedded default tokenizer."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tokctl.imagetok import tokfile
from tokctl.imagetok.checkpoint import DEFAULT_TOKENIZER, load_tokenizer

pytestmark = pytest.mark.slow
TOKCTL = [sys.executable, "-m", "tokctl.cli"]


def tokctl(*args, cwd):
    return subprocess.run([*TOKCTL, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_default_ships_small():
    assert DEFAULT_TOKENIZER.stat().st_size < 20 * 2**20
    tok = load_tokenizer()
    assert tok.model.variable_length and tok.model.max_tokens == 64
    assert tok.model.codebook_size == 512
    assert tok.model.proxy is not None  # TiTok's two-stage recipe around the shipped vq2d


def test_encode_decode_encode_on_the_default(tmp_path):
    import skimage.data

    photos = tmp_path / "in"
    photos.mkdir()
    Image.fromarray(skimage.data.astronaut()).save(photos / "astronaut.png")
    Image.fromarray(skimage.data.coffee()).resize((120, 80)).save(photos / "coffee.jpg")
    (photos / "notes.png").write_text("not an image")
    res = tokctl("tokenize-image", "encode", *sorted(photos.iterdir()), "--out", tmp_path / "tok",
                 "--tokens", "32", cwd=tmp_path)
    assert res.returncode == 1 and "notes.png" in res.stderr and "Traceback" not in res.stderr
    tok_files = sorted((tmp_path / "tok").glob("*.tok"))
    assert [p.name for p in tok_files] == ["astronaut.tok", "coffee.tok"]
    # plain ids: 32 x 9 bits = 36 bytes a 64x64 tile; 512x512 is 64 tiles, 120x80 is 2 x 2
    res = tokctl("tokenize-image", "encode", photos / "astronaut.png", photos / "coffee.jpg",
                 "--out", tmp_path / "raw", "--tokens", "32", "--raw", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    raw = sorted((tmp_path / "raw").glob("*.tok"))
    assert [p.stat().st_size for p in raw] == [10 + 64 * 36, 8 + 4 * 36]
    # coded under the shipped prior: smaller than plain
    assert all(c.stat().st_size < r.stat().st_size for c, r in zip(tok_files, raw))

    res = tokctl("tokenize-image", "decode", *tok_files, "--out", tmp_path / "png",
                 "--side-by-side", photos, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert Image.open(tmp_path / "png" / "coffee.png").size == (2 * 120 + 4, 80)
    res = tokctl("tokenize-image", "decode", *tok_files, "--out", tmp_path / "png1", cwd=tmp_path)
    assert Image.open(tmp_path / "png1" / "coffee.png").size == (120, 80)

    # the same image encodes to the same bytes, and the file holds exactly those tokens
    again = tokctl("tokenize-image", "encode", photos / "astronaut.png", "--out", tmp_path / "t2",
                   "--tokens", "32", cwd=tmp_path)
    assert again.returncode == 0
    assert (tmp_path / "t2" / "astronaut.tok").read_bytes() == tok_files[0].read_bytes()


def test_eval_on_the_default(tmp_path):
    res = tokctl("tokenize-image", "eval", "data.limit=3", "rfid=false", "speed_repeats=1",
                 "threads=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    rows = [e for e in m["entries"] if e["codec"] == "onedpiece"]
    assert [e["tokens"] for e in rows] == [8, 16, 32, 64]
    assert [e["bytes_per_image"] for e in rows] == [17, 26, 44, 80]
    ssim = [e["ssim"] for e in rows]
    assert ssim == sorted(ssim) and ssim[-1] > ssim[0] + 0.05  # every prefix adds detail
    assert {e["codec"] for e in m["entries"]} == {"onedpiece", "onedpiece+prior", "jpeg", "webp",
                                                  "avif", "jxl"}
    coded = [e for e in m["entries"] if e["codec"] == "onedpiece+prior"]
    assert all(e["coded_round_trip"] for e in coded)
    # encode codes a file only where that makes it smaller: never larger, smaller at 64 tokens
    assert all(c["bytes_per_image"] <= r["bytes_per_image"] for c, r in zip(coded, rows))
    assert coded[-1]["bytes_per_image"] < rows[-1]["bytes_per_image"]
    assert (tmp_path / "run" / "rate_distortion.png").exists()


def test_the_shipped_grid_tokenizer_by_name(tmp_path):
    """--tokenizer vq2d: 64 tokens of 9 bits a 64x64 tile (no prior: plain ids), 152 bytes for a
    96x64 image (two tiles); decode finds the shipped tokenizer that made a file by its hash."""
    assert load_tokenizer("vq2d").model.codebook_size == 512
    Image.new("RGB", (96, 64), (200, 120, 40)).save(tmp_path / "flat.png")
    res = tokctl("tokenize-image", "encode", tmp_path / "flat.png", "--out", tmp_path / "tok",
                 "--tokenizer", "vq2d", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "tok" / "flat.tok").stat().st_size == 8 + 2 * 72
    res = tokctl("tokenize-image", "decode", tmp_path / "tok" / "flat.tok", "--out", tmp_path / "png",
                 cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert Image.open(tmp_path / "png" / "flat.png").size == (96, 64)
    res = tokctl("tokenize-image", "decode", tmp_path / "tok" / "flat.tok", "--out", tmp_path / "x",
                 "--tokenizer", "default", cwd=tmp_path)
    assert res.returncode == 1 and "made by another tokenizer" in res.stderr


def test_refined_and_rate_weighed_encoding_on_the_shipped_tokenizers(tmp_path):
    """--refine on the real tokenizers: the 24-bit grid tokenizer's files, coded under its
    digit prior (200 bytes plain), decode by its hash; on the default, --refine-rate codes in fewer bytes than refinement alone, and both
    reconstruct a held-out photo better than the encoder's own codes (by the refinement's
    objective)."""
    import skimage.data

    from tokctl.imagetok.data import square_thumbnail, to_tensor
    from tokctl.imagetok.refine import objective

    photo = square_thumbnail(Image.fromarray(skimage.data.chelsea()), 64)
    photo.save(tmp_path / "cat.png")
    res = tokctl("tokenize-image", "encode", tmp_path / "cat.png", "--out", tmp_path / "g",
                 "--tokenizer", "vq2d24", "--refine", "20", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "g" / "cat.tok").stat().st_size < 8 + 64 * 3  # coded: its digit prior
    res = tokctl("tokenize-image", "encode", tmp_path / "cat.png", "--out", tmp_path / "raw",
                 "--tokenizer", "vq2d24", "--refine", "20", "--raw", cwd=tmp_path)
    assert (tmp_path / "raw" / "cat.tok").stat().st_size == 8 + 64 * 3
    res = tokctl("tokenize-image", "decode", tmp_path / "g" / "cat.tok", "--out", tmp_path / "gp",
                 cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    sizes, scores = {}, {}
    for name, extra in {"plain": [], "refined": ["--refine", "40"],
                        "rate": ["--refine", "40", "--refine-rate", "0.05"]}.items():
        res = tokctl("tokenize-image", "encode", tmp_path / "cat.png", "--out", tmp_path / name,
                     *extra, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        sizes[name] = (tmp_path / name / "cat.tok").stat().st_size
        res = tokctl("tokenize-image", "decode", tmp_path / name / "cat.tok", "--out",
                     tmp_path / f"{name}-png", cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        recon = to_tensor(Image.open(tmp_path / f"{name}-png" / "cat.png").convert("RGB"))
        scores[name] = float(objective(recon[None], to_tensor(photo)[None]))
    assert sizes["rate"] < sizes["refined"]
    assert scores["refined"] < scores["plain"] and scores["rate"] < scores["plain"]


def test_the_shipped_128_token_tokenizer_codes_under_its_prior(tmp_path):
    """--tokenizer onedpiece128: 128 tokens a tile, any prefix decodes, and its shipped prior
    codes a held-out photo's 128 tokens in fewer bytes than their 144 plain ones."""
    import skimage.data

    from tokctl.imagetok import prior as prior_mod
    from tokctl.imagetok.data import square_thumbnail

    tok = load_tokenizer("onedpiece128")
    assert tok.model.variable_length and tok.model.max_tokens == 128
    assert prior_mod.prior_for(tok.hash).model.max_tokens == 128
    square_thumbnail(Image.fromarray(skimage.data.chelsea()), 64).save(tmp_path / "cat.png")
    res = tokctl("tokenize-image", "encode", tmp_path / "cat.png", "--out", tmp_path / "t",
                 "--tokenizer", "onedpiece128", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "t" / "cat.tok").stat().st_size < 8 + 144
    res = tokctl("tokenize-image", "decode", tmp_path / "t" / "cat.tok", "--out", tmp_path / "p",
                 cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert Image.open(tmp_path / "p" / "cat.png").size == (64, 64)


def test_the_shipped_32_bit_grid_tokenizer_codes_its_digits(tmp_path):
    """--tokenizer vq2d32: vq2d24's weights on a grid of 16 levels a dimension (2^32 ids a cell),
    whose shipped digit prior codes a held-out photo's refined 64 cells far under their 264 plain
    bytes; the file names that prior and decodes; weighing bits while refining makes it smaller."""
    import skimage.data

    from tokctl.imagetok import prior as prior_mod
    from tokctl.imagetok.data import square_thumbnail

    tok = load_tokenizer("vq2d32")
    assert tok.model.codebook_size == 2 ** 32
    assert torch.equal(tok.model.decoder_pos, load_tokenizer("vq2d24").model.decoder_pos)
    prior = prior_mod.prior_for(tok.hash)
    assert prior.model.kind == "digits"
    square_thumbnail(Image.fromarray(skimage.data.astronaut()), 64).save(tmp_path / "a.png")
    sizes = {}
    for name, extra in {"refined": [], "rate": ["--refine-rate", "0.02"]}.items():
        res = tokctl("tokenize-image", "encode", tmp_path / "a.png", "--out", tmp_path / name,
                     "--tokenizer", "vq2d32", "--refine", "10", *extra, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        blob = (tmp_path / name / "a.tok").read_bytes()
        assert tokfile.read_header(blob)[0].prior_hash == prior.hash
        sizes[name] = len(blob)
        res = tokctl("tokenize-image", "decode", tmp_path / name / "a.tok", "--out",
                     tmp_path / f"{name}-png", cwd=tmp_path)
        assert res.returncode == 0, res.stderr
    assert sizes["rate"] < sizes["refined"] < 8 + 64 * 4
