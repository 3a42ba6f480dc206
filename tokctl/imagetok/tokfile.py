"""The token file: one image as a compact header and its token ids, bit-packed or
arithmetic-coded under a token prior.

Version 2 (written by encode): the image as tiles of the tokenizer's input size. Layout (all
integers big-endian; a "varint" is LEB128: 7 bits per byte, high bit = more follows)::

    byte 0      magic 0xD1
    byte 1      high 3 bits: format version (2); bit 4: coded; low 4 bits: tokenizer kind
                (0 titok, 1 onedpiece, 2 flexnested, 3 vq2d, 15 other)
    bytes 2-4   tokenizer hash: 24 bits of SHA-256 over the tokenizer's config and weights
    bytes 5-7   coded files only: the hash of the prior that coded the ids (prior.py)
    varint      image width
    varint      image height
    varint      tokens per tile n
    then        the ids of every tile: the image padded (edges repeated) to whole tiles of the
                tokenizer's size S, ceil(W/S) x ceil(H/S) tiles in row-major order, n ids each.
                Plain: each id in ceil(log2(codebook size)) bits, most significant bit first,
                tile after tile, the last byte padded with zero bits. Coded: the range coder's
                bytes to the end of the file (prior.encode_ids).

Version 1 (still read): one tile, the whole image resized to the tokenizer's size (decode
resizes back), byte 1's low 5 bits the kind (31 other), no coded bit, plain ids.

A 64x64 image with n < 128 tokens has an 8-byte header (11 coded); 64 tokens of a 512-code
tokenizer take 72 more bytes plain. The file's size is the figure every rate-distortion table
counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAGIC = 0xD1
VERSION = 2
VERSIONS = (1, 2)
KINDS = {"titok": 0, "onedpiece": 1, "flexnested": 2, "vq2d": 3}
OTHER_KIND = 15  # 31 in version 1 files


class TokenFileError(ValueError):
    """A file that is not a token file, is truncated, or belongs to another tokenizer."""


@dataclass
class TokenFile:
    kind: int
    tokenizer_hash: int
    width: int
    height: int
    tokens: np.ndarray  # int64 ids: (tiles, n) in version 2; (n,) in version 1 (one resized image)
    prior_hash: int | None = None  # the prior that coded the ids; None: plain bits

    @property
    def kind_name(self) -> str:
        return next((k for k, v in KINDS.items() if v == self.kind), f"kind {self.kind}")

    @property
    def version(self) -> int:
        return 1 if self.tokens.ndim == 1 else 2

    @property
    def tokens_per_tile(self) -> int:
        return self.tokens.shape[-1]


def tile_grid(width: int, height: int, tile: int) -> tuple[int, int]:
    """(columns, rows) of tiles covering a width x height image."""
    return -(-width // tile), -(-height // tile)


def _varint(value: int) -> bytes:
    if value < 0:
        raise ValueError("varints are unsigned")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise TokenFileError("truncated header")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 35:
            raise TokenFileError("corrupt header (varint too long)")


def pack_bits(ids: np.ndarray, bits: int) -> bytes:
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= (1 << bits)):
        raise ValueError(f"token ids must lie in [0, 2^{bits})")
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    bitarr = ((ids[:, None] >> shifts[None, :]) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(bitarr).tobytes()


def unpack_bits(data: bytes, n: int, bits: int) -> np.ndarray:
    need = (n * bits + 7) // 8
    if len(data) < need:
        raise TokenFileError(f"truncated: {n} tokens need {need} bytes of ids, {len(data)} found")
    if len(data) > need:
        raise TokenFileError(f"{len(data) - need} unexpected bytes after the last token")
    bitarr = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: n * bits].astype(np.int64)
    weights = 1 << np.arange(bits - 1, -1, -1, dtype=np.int64)
    return (bitarr.reshape(n, bits) * weights).sum(1) if n else np.zeros(0, dtype=np.int64)


def bits_for(codebook_size: int) -> int:
    return max(1, int(codebook_size - 1).bit_length())


def dumps(tf: TokenFile, codebook_size: int, coded: bytes | None = None) -> bytes:
    """The file's bytes. Version 2 (2-D tokens): ``coded``, the range coder's bytes of the ids,
    when ``tf.prior_hash`` is set; plain bits otherwise."""
    if tf.tokens.ndim == 1:  # version 1: one resized image
        header = bytes([MAGIC, (1 << 5) | (tf.kind & 0x1F)]) + tf.tokenizer_hash.to_bytes(3, "big")
        header += _varint(tf.width) + _varint(tf.height) + _varint(len(tf.tokens))
        return header + pack_bits(tf.tokens, bits_for(codebook_size))
    is_coded = tf.prior_hash is not None
    if is_coded != (coded is not None):
        raise ValueError("a coded token file needs both its prior's hash and the coded bytes")
    kind = tf.kind if tf.kind < OTHER_KIND else OTHER_KIND
    header = bytes([MAGIC, (VERSION << 5) | (int(is_coded) << 4) | kind])
    header += tf.tokenizer_hash.to_bytes(3, "big")
    if is_coded:
        header += int(tf.prior_hash).to_bytes(3, "big")
    header += _varint(tf.width) + _varint(tf.height) + _varint(tf.tokens.shape[1])
    return header + (coded if is_coded else pack_bits(tf.tokens.reshape(-1),
                                                      bits_for(codebook_size)))


def read_header(data: bytes) -> tuple[TokenFile, int, int]:
    """The header's fields (tokens still empty; prior_hash set for a coded file), the token
    count per tile, and where the ids start."""
    if len(data) < 5:
        raise TokenFileError("truncated header" if data[:1] == bytes([MAGIC]) else
                             "not a token file (no 0xD1 magic byte)")
    if data[0] != MAGIC:
        raise TokenFileError("not a token file (no 0xD1 magic byte)")
    version = data[1] >> 5
    if version not in VERSIONS:
        raise TokenFileError(f"token file version {version}; this tokctl reads versions "
                             f"{', '.join(map(str, VERSIONS))}")
    kind = data[1] & 0x1F if version == 1 else data[1] & 0x0F
    is_coded = version == 2 and bool(data[1] & 0x10)
    hash24 = int.from_bytes(data[2:5], "big")
    pos, prior_hash = 5, None
    if is_coded:
        if len(data) < 8:
            raise TokenFileError("truncated header")
        prior_hash, pos = int.from_bytes(data[5:8], "big"), 8
    width, pos = _read_varint(data, pos)
    height, pos = _read_varint(data, pos)
    n, pos = _read_varint(data, pos)
    if width == 0 or height == 0:
        raise TokenFileError("corrupt header (zero image size)")
    shape = (0,) if version == 1 else (0, n)
    return TokenFile(kind, hash24, width, height, np.zeros(shape, dtype=np.int64), prior_hash), n, pos


def loads(data: bytes, codebook_size: int, expect_hash: int | None = None,
          tile_size: int | None = None, decode_coded=None) -> TokenFile:
    """Parse a token file. Version 2 needs the tokenizer's ``tile_size``; a coded one needs
    ``decode_coded(prior_hash, payload, tiles, n) -> (tiles, n) ids`` (it raises
    TokenFileError when it does not have that prior)."""
    tf, n, pos = read_header(data)
    if expect_hash is not None and tf.tokenizer_hash != expect_hash:
        raise TokenFileError(f"made by another tokenizer ({tf.kind_name}, hash "
                             f"{tf.tokenizer_hash:06x}; this one is {expect_hash:06x})")
    if tf.version == 1:
        tf.tokens = unpack_bits(data[pos:], n, bits_for(codebook_size))
        return tf
    if tile_size is None:
        raise ValueError("version 2 token files need the tokenizer's tile size to be read")
    cols, rows = tile_grid(tf.width, tf.height, tile_size)
    if cols * rows * n > 1 << 26:
        raise TokenFileError(f"corrupt header ({tf.width}x{tf.height} image, {n} tokens a tile)")
    if tf.prior_hash is None:
        tf.tokens = unpack_bits(data[pos:], cols * rows * n,
                                bits_for(codebook_size)).reshape(cols * rows, n)
        return tf
    if decode_coded is None:
        raise TokenFileError(f"coded under prior {tf.prior_hash:06x}; no prior was given to "
                             f"decode it")
    tf.tokens = np.asarray(decode_coded(tf.prior_hash, data[pos:], cols * rows, n),
                           dtype=np.int64).reshape(cols * rows, n)
    return tf
