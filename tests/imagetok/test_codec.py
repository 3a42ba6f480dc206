"""encode/decode through token files, and their error handling (library level and CLI)."""

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from tokctl.cli import app
from tokctl.imagetok import tokfile
from tokctl.imagetok.checkpoint import load_tokenizer, save_tokenizer
from tokctl.imagetok.codec import decode_files, encode_images, read_token_bytes
from tokctl.imagetok.data import to_image
from tests.imagetok.conftest import make_tiny


def test_file_round_trip_keeps_exact_tokens(tiny_tokenizer_file, images):
    tok = load_tokenizer(tiny_tokenizer_file[0])
    pil = [to_image(x) for x in images]
    blobs = encode_images(tok, pil, 4)
    direct = tok.model.encode(images)[:, :4]
    for blob, row in zip(blobs, direct):
        tf = read_token_bytes(tok, blob)
        assert np.array_equal(tf.tokens, row.numpy()[None])  # one 32x32 tile
        assert len(blob) == 8 + (4 * 6 + 7) // 8  # 64 codes: 6 bits a token
    # encoding the same images again gives byte-identical files
    assert encode_images(tok, pil, 4) == blobs
    out = decode_files(tok, [read_token_bytes(tok, b) for b in blobs])
    assert [im.size for im in out] == [(32, 32)] * 5


def test_decode_restores_original_size(tiny_tokenizer_file):
    tok = load_tokenizer(tiny_tokenizer_file[0])
    im = Image.new("RGB", (50, 20), (200, 10, 10))
    blob = encode_images(tok, [im], tok.model.max_tokens)[0]
    tf = read_token_bytes(tok, blob)
    assert tf.tokens.shape == (2, 6)  # two 32x32 tiles cover 50x20
    assert decode_files(tok, [tf])[0].size == (50, 20)


def test_hash_covers_weights(tmp_path):
    a, cfg = make_tiny(seed=0)
    b, _ = make_tiny(seed=1)
    save_tokenizer(tmp_path / "a.pt", a, cfg, {})
    save_tokenizer(tmp_path / "b.pt", b, cfg, {})
    assert load_tokenizer(tmp_path / "a.pt").hash != load_tokenizer(tmp_path / "b.pt").hash


def _write_images(folder, n=2):
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray((np.random.default_rng(i).random((40, 40, 3)) * 255).astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def test_cli_encode_decode_with_bad_inputs(tiny_tokenizer_file, tmp_path):
    runner = CliRunner()
    path, cfg = tiny_tokenizer_file
    imgs = _write_images(tmp_path / "in")
    broken = tmp_path / "in" / "broken.png"
    broken.write_bytes(b"not an image")
    res = runner.invoke(app, ["tokenize-image", "encode", *map(str, imgs), str(broken),
                              "--out", str(tmp_path / "tok"), "--tokens", "5",
                              "--tokenizer", str(path)])
    assert res.exit_code == 1
    assert "broken.png" in res.output and "Traceback" not in res.output
    toks = sorted((tmp_path / "tok").glob("*.tok"))
    assert [t.name for t in toks] == ["img0.tok", "img1.tok"]  # the good ones were written

    # a truncated file and a file from another tokenizer, beside a good one
    truncated = tmp_path / "tok" / "cut.tok"
    truncated.write_bytes(toks[0].read_bytes()[:-2])
    other_model, _ = make_tiny(seed=5)
    save_tokenizer(tmp_path / "other.pt", other_model, cfg, {})
    runner.invoke(app, ["tokenize-image", "encode", str(imgs[0]), "--out", str(tmp_path / "o"),
                        "--tokenizer", str(tmp_path / "other.pt")])
    res = runner.invoke(app, ["tokenize-image", "decode", str(toks[0]), str(truncated),
                              str(tmp_path / "o" / "img0.tok"), str(tmp_path / "missing.tok"),
                              "--out", str(tmp_path / "png"), "--tokenizer", str(path)])
    assert res.exit_code == 1, res.output
    assert "truncated" in res.output and "another tokenizer" in res.output
    assert "Traceback" not in res.output
    assert [p.name for p in (tmp_path / "png").glob("*.png")] == ["img0.png"]
    assert Image.open(tmp_path / "png" / "img0.png").size == (40, 40)


def test_cli_usage_errors(tiny_tokenizer_file, tmp_path):
    runner = CliRunner()
    path, _ = tiny_tokenizer_file
    img = _write_images(tmp_path / "in", 1)[0]
    res = runner.invoke(app, ["tokenize-image", "encode", str(img), "--tokenizer", str(path)])
    assert res.exit_code == 2  # --out missing
    res = runner.invoke(app, ["tokenize-image", "encode", str(img), "--out", str(tmp_path),
                              "--tokens", "99", "--tokenizer", str(path)])
    assert res.exit_code == 2 and "--tokens 99" in res.output
    res = runner.invoke(app, ["tokenize-image", "decode", str(img), "--out", str(tmp_path),
                              "--tokenizer", str(tmp_path / "nope.pt")])
    assert res.exit_code == 2 and "nope.pt" in res.output
