"""Training photo sets from Debian packages, texture-weighted crops, the held-out textured set."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tokctl.errors import UserError
from tokctl.imagetok import photosets
from tokctl.imagetok.data import CropSampler, eval_images, texture_score


def _flat(size=128):
    return Image.new("RGB", (size, size), (120, 140, 160))


def _noisy(size=128, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def test_texture_score_orders_flat_below_noise():
    assert texture_score(_flat()) == 0.0
    assert texture_score(_noisy()) > 0.2


def test_texture_weighting_prefers_textured_crops():
    def textured_share(k):
        s = CropSampler([], 64, seed=1, photos=[_flat(), _noisy()], texture=k)
        return np.mean([texture_score(s.sample()) > 0.05 for _ in range(200)])

    uniform, weighted = textured_share(1), textured_share(4)
    assert 0.35 < uniform < 0.65  # one photo of two: about half the crops
    assert weighted > 0.9  # of 4 candidates, the flat ones are kept with weight 1e-3


def _rcc(files: dict[str, tuple[bytes, bool]]) -> bytes:
    """A format-3 Qt resource file holding ``dir/NAME`` files (data, zlib-compressed?)."""
    names, data, name_off, data_off = b"", b"", {}, {}
    for n in ["dir", *files]:
        name_off[n] = len(names)
        enc = n.encode("utf-16-be")
        names += struct.pack(">HI", len(n), 0) + enc
    for n, (blob, packed) in files.items():
        data_off[n] = len(data)
        body = struct.pack(">I", len(blob)) + zlib.compress(blob) if packed else blob
        data += struct.pack(">I", len(body)) + body
    pad = 8  # last-modified field of format 2+ nodes
    tree = struct.pack(">IHII", 0, 2, 1, 1) + bytes(pad)  # root: one child, node 1
    tree += struct.pack(">IHII", name_off["dir"], 2, len(files), 2) + bytes(pad)
    for n, (_, packed) in files.items():
        tree += struct.pack(">IHHHI", name_off[n], 1 if packed else 0, 0, 0, data_off[n]) \
            + bytes(pad)
    header = 24
    return (b"qres" + struct.pack(">5I", 3, header, header + len(tree),
                                  header + len(tree) + len(data), 0)
            + tree + data + names)


def test_rcc_reader_reads_plain_and_compressed_files(tmp_path):
    files = {"a.txt": (b"hello", False), "b.bin": (b"x" * 1000, True)}
    path = tmp_path / "t.rcc"
    path.write_bytes(_rcc(files))
    assert dict(photosets.rcc_files(path)) == {"dir/a.txt": b"hello", "dir/b.bin": b"x" * 1000}
    path.write_bytes(b"nope")
    with pytest.raises(ValueError):
        list(photosets.rcc_files(path))


def test_textured_set_reads_puzzle_jpegs_and_counts_missing(tmp_path, monkeypatch):
    jpeg = io.BytesIO()
    _noisy(96).save(jpeg, "JPEG")
    pzl = tmp_path / "fur-3x3.pzl"
    pzl.write_bytes(b"PzlF\n0.1\nfur-3x3\n" + jpeg.getvalue() + b"\x89PNG mask")
    _noisy(80, seed=2).save(tmp_path / "fruit.jpg")
    monkeypatch.setattr(photosets, "TEXTURED", (("fur", pzl), ("fruit", tmp_path / "fruit.jpg"),
                                                ("gone", tmp_path / "gone.jpg")))
    names, images, skipped = eval_images(None, 32, photos="textured")
    assert names == ["fur", "fruit"] and images.shape == (2, 3, 32, 32)
    assert list(skipped) == ["gone"] and "TOKCTL_PHOTOS=1" in skipped["gone"]
    with pytest.raises(UserError, match="data.photos=bogus"):
        eval_images(None, 32, photos="bogus")


def test_opencv_set_reads_its_photos_and_names_the_package_when_missing(tmp_path, monkeypatch):
    _noisy(90).save(tmp_path / "apple.jpg")
    monkeypatch.setattr(photosets, "OPENCV", (("apple", tmp_path / "apple.jpg"),
                                              ("baboon", tmp_path / "baboon.jpg")))
    names, images, skipped = eval_images(None, 32, photos="opencv")
    assert names == ["apple"] and images.shape == (1, 3, 32, 32)
    assert list(skipped) == ["baboon"] and "opencv-doc" in skipped["baboon"]


def test_dep5_licences_last_matching_stanza_wins(tmp_path):
    cp = tmp_path / "copyright"
    cp.write_text("Format: x\n\nFiles: *\nCopyright: Someone\nLicense: GPL-3+\n\n"
                  "Files: src/a/*.jpg\n       src/b/c.png\nCopyright: Photographer\n"
                  "License: CC-BY-SA-3.0\n text of the licence\n")
    stanzas = photosets.dep5_licences(cp)
    assert photosets.licence_of("src/a/x.webp", stanzas) == ("CC-BY-SA-3.0", "Photographer")
    assert photosets.licence_of("src/b/c.png", stanzas)[0] == "CC-BY-SA-3.0"
    assert photosets.licence_of("src/z.webp", stanzas) == ("GPL-3+", "Someone")
