"""A tokenizer's vocabulary as byte strings: what the byte-level view of a model needs to know.

- the bytes of every token (byte-level BPE as GPT-2 and SmolLM2 write them, SentencePiece pieces
  with ``▁`` and byte fallback as Gemma writes them); special tokens have none;
- the tokens sorted by their bytes, so that "every token that starts with these bytes" is one
  contiguous range found by bisection;
- whether a token sequence is *canonical*: the one the tokenizer itself produces for its bytes.
  A model trained on canonical encodings gives the others almost no probability, so the byte
  view prunes them (Phan et al.'s invalid encodings).

Built once per tokenizer (a second or so for a 262k vocabulary) and kept beside it.
"""

from __future__ import annotations

import bisect
import json
import weakref
from functools import lru_cache

import torch

from tokctl.errors import UserError

# The round trip every tokenizer must pass before its bytes are trusted: ASCII, whitespace runs,
# accents, a curly quote, CJK, an emoji.
PROBE = "Hello,  world!\n\tdef f(x): return x**2  # héllo wörld — it’s 你好 🙂 0123456789"
PREFIX_COLUMNS = 8  # bytes per token kept in a table; longer prefixes are read from the strings


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes, reversed (the byte-level BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def _style(tokenizer) -> str:
    """How the vocabulary writes bytes: "bytelevel" or "sentencepiece"."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"{type(tokenizer).__name__} is not a fast tokenizer: the byte-level view "
                        f"needs a tokenizers-backed (tokenizer.json) tokenizer")
    spec = json.loads(backend.to_str())
    text = json.dumps([spec.get("decoder"), spec.get("pre_tokenizer")])
    if '"ByteLevel"' in text:
        return "bytelevel"
    return "sentencepiece"


def _token_bytes(tokenizer, size: int) -> list[bytes]:
    style = _style(tokenizer)
    special = set(tokenizer.all_special_ids)
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            special.add(int(i))
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    table = _byte_decoder()
    out: list[bytes] = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            out.append(b"")
        elif style == "bytelevel" and all(ch in table for ch in piece):
            out.append(bytes(table[ch] for ch in piece))
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))  # byte fallback
        else:
            out.append(piece.replace("▁", " ").encode("utf-8"))
    out += [b""] * (size - len(out))  # embedding rows past the tokenizer's ids
    return out


class TokenBytes:
    """The byte strings of a vocabulary of ``size`` ids (the model's head may be wider than the
    tokenizer; the extra ids have no bytes)."""

    def __init__(self, tokenizer, size: int):
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer if hasattr(tokenizer, "backend_tokenizer") \
            else None
        self.bytes = _token_bytes(tokenizer, size)
        self.size = size
        self._check_round_trip()
        order = sorted((i for i, b in enumerate(self.bytes) if b), key=lambda i: self.bytes[i])
        self.sorted_ids = torch.tensor(order, dtype=torch.long)
        self.sorted_bytes = [self.bytes[i] for i in order]
        self.sorted_len = torch.tensor([len(b) for b in self.sorted_bytes], dtype=torch.long)
        packed = b"".join(b[:PREFIX_COLUMNS].ljust(PREFIX_COLUMNS, b"\0")
                          for b in self.sorted_bytes)
        cols = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
        cols = cols.view(-1, PREFIX_COLUMNS).to(torch.int16)
        short = torch.arange(PREFIX_COLUMNS)[None, :] >= self.sorted_len[:, None]
        self.columns = cols.masked_fill(short, 256)  # 256: the token has no byte there
        # the first byte of every id (256 for ids without bytes), for whole-vocabulary sums
        first = torch.full((size,), 257, dtype=torch.long)
        first[self.sorted_ids] = cols[:, 0].long()
        self.first_byte = first
        self.has_bytes = first < 256
        self.single_byte = {}  # byte -> a token of that byte alone
        for i, b in enumerate(self.bytes):
            if len(b) == 1:
                self.single_byte.setdefault(b[0], i)

    def _check_round_trip(self) -> None:
        ids = self.encode(PROBE)
        got = b"".join(self.bytes[i] for i in ids)
        if got != PROBE.encode("utf-8"):
            at = next((k for k, (a, b) in enumerate(zip(got, PROBE.encode())) if a != b),
                      min(len(got), len(PROBE.encode())))
            raise UserError(f"the tokenizer {type(self.tokenizer).__name__} cannot map its tokens "
                            f"to bytes (its tokens spell {got[max(0, at - 8):at + 8]!r} where the "
                            f"text has {PROBE.encode()[max(0, at - 8):at + 8]!r}); the byte-level "
                            f"view needs byte-level BPE or SentencePiece pieces without a "
                            f"normalizer")

    # --- encoding ----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self.backend is not None:
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def canonical(self, prefix: tuple[int, ...], prefix_bytes: bytes,
                  candidates: list[int]) -> list[bool]:
        """For each candidate t: is ``prefix + (t,)`` the tokenizer's own encoding of its bytes?
        Sequences that end inside a UTF-8 character cannot be encoded as text: they count as
        canonical (not pruned)."""
        try:
            head = prefix_bytes.decode("utf-8")
        except UnicodeDecodeError:
            return [True] * len(candidates)
        out = [True] * len(candidates)
        texts, where = [], []
        for k, t in enumerate(candidates):
            try:
                texts.append(head + self.bytes[t].decode("utf-8"))
            except UnicodeDecodeError:
                continue
            where.append(k)
        want = list(prefix)
        for k, ids in zip(where, self.encode_many(texts)):
            out[k] = len(ids) == len(want) + 1 and ids[-1] == candidates[k] and ids[:-1] == want
        return out

    # --- ranges ------------------------------------------------------------------------------
    def prefix_range(self, prefix: bytes) -> tuple[int, int]:
        """Positions [lo, hi) in the sorted order of the tokens whose bytes start with ``prefix``
        (the token equal to it, if any, first)."""
        lo = bisect.bisect_left(self.sorted_bytes, prefix)
        upper = prefix.rstrip(b"\xff")
        if not upper:
            return lo, len(self.sorted_bytes)
        upper = upper[:-1] + bytes([upper[-1] + 1])
        return lo, bisect.bisect_left(self.sorted_bytes, upper, lo)

    def byte_at(self, lo: int, hi: int, k: int) -> torch.Tensor:
        """Byte k of the tokens at sorted positions [lo, hi) (256 where a token is that short)."""
        if k < PREFIX_COLUMNS:
            return self.columns[lo:hi, k].long()
        return torch.tensor([b[k] if len(b) > k else 256 for b in self.sorted_bytes[lo:hi]],
                            dtype=torch.long)


_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def token_bytes(tokenizer, size: int | None = None) -> TokenBytes:
    """The (cached) :class:`TokenBytes` of ``tokenizer``, for a head of ``size`` ids."""
    size = int(size or len(tokenizer))
    per_size = _TABLES.setdefault(tokenizer, {})
    if size not in per_size:
        per_size[size] = TokenBytes(tokenizer, size)
    return per_size[size]
