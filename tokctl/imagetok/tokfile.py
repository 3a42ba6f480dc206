"""The token file: one image as a compact header and its token ids, bit-packed.

Layout (all integers big-endian; a "varint" is LEB128: 7 bits per byte, high bit = more follows)::

    byte 0      magic 0xD1
    byte 1      high 3 bits: format version (1); low 5 bits: tokenizer kind
                (0 titok, 1 onedpiece, 2 flexnested, 3 vq2d, 31 other)
    bytes 2-4   tokenizer hash: 24 bits of SHA-256 over the tokenizer's config and weights
    varint      image width  (of the original image; decode resizes back to it)
    varint      image height
    varint      token count n
    then        n ids, each ceil(log2(codebook size)) bits, most significant bit first,
                the last byte padded with zero bits

A 64x64 image with n < 128 tokens has an 8-byte header; 48 tokens of a 4096-code tokenizer take
72 more bytes. The file's size is the figure every rate-distortion table counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAGIC = 0xD1
VERSION = 1
KINDS = {"titok": 0, "onedpiece": 1, "flexnested": 2, "vq2d": 3}
OTHER_KIND = 31


class TokenFileError(ValueError):
    """A file that is not a token file, is truncated, or belongs to another tokenizer."""


@dataclass
class TokenFile:
    kind: int
    tokenizer_hash: int
    width: int
    height: int
    tokens: np.ndarray  # int64 ids

    @property
    def kind_name(self) -> str:
        return next((k for k, v in KINDS.items() if v == self.kind), f"kind {self.kind}")


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


def dumps(tf: TokenFile, codebook_size: int) -> bytes:
    header = bytes([MAGIC, (VERSION << 5) | (tf.kind & 0x1F)]) + tf.tokenizer_hash.to_bytes(3, "big")
    header += _varint(tf.width) + _varint(tf.height) + _varint(len(tf.tokens))
    return header + pack_bits(tf.tokens, bits_for(codebook_size))


def read_header(data: bytes) -> tuple[TokenFile, int, int]:
    """The header's fields (tokens still empty), the token count, and where the ids start."""
    if len(data) < 5:
        raise TokenFileError("truncated header" if data[:1] == bytes([MAGIC]) else
                             "not a token file (no 0xD1 magic byte)")
    if data[0] != MAGIC:
        raise TokenFileError("not a token file (no 0xD1 magic byte)")
    version, kind = data[1] >> 5, data[1] & 0x1F
    if version != VERSION:
        raise TokenFileError(f"token file version {version}; this tokctl reads version {VERSION}")
    hash24 = int.from_bytes(data[2:5], "big")
    width, pos = _read_varint(data, 5)
    height, pos = _read_varint(data, pos)
    n, pos = _read_varint(data, pos)
    if width == 0 or height == 0:
        raise TokenFileError("corrupt header (zero image size)")
    return TokenFile(kind, hash24, width, height, np.zeros(0, dtype=np.int64)), n, pos


def loads(data: bytes, codebook_size: int, expect_hash: int | None = None) -> TokenFile:
    tf, n, pos = read_header(data)
    if expect_hash is not None and tf.tokenizer_hash != expect_hash:
        raise TokenFileError(f"made by another tokenizer ({tf.kind_name}, hash "
                             f"{tf.tokenizer_hash:06x}; this one is {expect_hash:06x})")
    tf.tokens = unpack_bits(data[pos:], n, bits_for(codebook_size))
    return tf

