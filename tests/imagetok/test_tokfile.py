import numpy as np
import pytest

from tokctl.imagetok import tokfile


@pytest.mark.parametrize("bits", [1, 3, 10, 12, 16])
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    ids = rng.integers(0, 1 << bits, size=37)
    data = tokfile.pack_bits(ids, bits)
    assert len(data) == (37 * bits + 7) // 8
    assert np.array_equal(tokfile.unpack_bits(data, 37, bits), ids)


def test_header_fields_and_exact_size():
    tf = tokfile.TokenFile(1, 0xABCDEF, 64, 48, np.arange(48) * 80)
    data = tokfile.dumps(tf, 4096)
    assert len(data) == 8 + 48 * 12 // 8  # 8-byte header for a small image, 12 bits a token
    back = tokfile.loads(data, 4096, expect_hash=0xABCDEF)
    assert (back.kind, back.tokenizer_hash, back.width, back.height) == (1, 0xABCDEF, 64, 48)
    assert np.array_equal(back.tokens, tf.tokens)
    assert back.kind_name == "onedpiece"


def test_large_image_size_varint():
    tf = tokfile.TokenFile(0, 1, 4000, 300, np.array([5, 6]))
    assert tokfile.loads(tokfile.dumps(tf, 1024), 1024).width == 4000


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d[:-1], "truncated"),
    (lambda d: d[:6], "truncated"),
    (lambda d: d + b"\0", "unexpected bytes"),
    (lambda d: b"\x89PNG" + d[4:], "not a token file"),
    (lambda d: d[:1] + bytes([0xE1]) + d[2:], "version"),
])
def test_bad_files_raise_one_clear_error(mutate, message):
    data = tokfile.dumps(tokfile.TokenFile(1, 7, 64, 64, np.arange(10)), 4096)
    with pytest.raises(tokfile.TokenFileError, match=message):
        tokfile.loads(mutate(data), 4096)


def test_other_tokenizer_is_refused():
    data = tokfile.dumps(tokfile.TokenFile(1, 7, 64, 64, np.arange(10)), 4096)
    with pytest.raises(tokfile.TokenFileError, match="another tokenizer"):
        tokfile.loads(data, 4096, expect_hash=8)


def test_version2_tiles_plain_and_coded_headers():
    ids = np.arange(6 * 10).reshape(6, 10) % 512  # 70x40 at 32-pixel tiles: 3 x 2 tiles
    tf = tokfile.TokenFile(1, 0xABCDEF, 70, 40, ids)
    data = tokfile.dumps(tf, 512)
    assert data[1] >> 5 == 2 and len(data) == 8 + 60 * 9 // 8 + 1  # 540 bits -> 68 bytes
    back = tokfile.loads(data, 512, expect_hash=0xABCDEF, tile_size=32)
    assert np.array_equal(back.tokens, ids) and back.prior_hash is None
    with pytest.raises(tokfile.TokenFileError, match="truncated"):
        tokfile.loads(data[:-1], 512, tile_size=32)

    coded = tokfile.TokenFile(1, 0xABCDEF, 70, 40, ids, prior_hash=0x123456)
    data = tokfile.dumps(coded, 512, b"\x07\x08")
    assert len(data) == 11 + 2  # 3 more header bytes: the prior's hash
    seen = {}

    def decode(h, payload, tiles, n):
        seen.update(h=h, payload=payload, tiles=tiles, n=n)
        return ids

    back = tokfile.loads(data, 512, tile_size=32, decode_coded=decode)
    assert seen == {"h": 0x123456, "payload": b"\x07\x08", "tiles": 6, "n": 10}
    assert back.prior_hash == 0x123456 and np.array_equal(back.tokens, ids)
    with pytest.raises(tokfile.TokenFileError, match="no prior"):
        tokfile.loads(data, 512, tile_size=32)
