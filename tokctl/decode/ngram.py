"""A token n-gram model for Superposed Decoding: counts of what followed each context of 1..n-1
tokens, saved as one JSON file that records which tokenizer its ids belong to.

Superposed Decoding (Shen et al., 2024) interpolates the language model's next-token distribution
with n-gram probabilities of each draft's recent tokens, mixed over context lengths with fixed
weights; contexts never seen contribute nothing (the paper's "no interpolation" case).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import torch

from tokctl.errors import UserError

FORMAT = "tokctl-ngram/1"


def tokenizer_fingerprint(tokenizer) -> dict[str, object]:
    """Vocabulary size and a hash of the token -> id table: two tokenizers with the same
    fingerprint give the same ids to the same strings."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha1(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {"vocab_size": len(vocab), "sha1": digest,
            "name": getattr(tokenizer, "name_or_path", "") or ""}


class NGramModel:
    """``tables[i]``: context of i tokens -> Counter of next tokens, for i = 1 .. n-1."""

    def __init__(self, n: int, tokenizer_info: dict[str, object] | None = None):
        if n < 2:
            raise UserError(f"n={n}: an n-gram model needs n >= 2 (a context of at least 1 token)")
        self.n = n
        self.tokenizer = tokenizer_info or {}
        self.tables: dict[int, dict[tuple[int, ...], Counter]] = {
            i: defaultdict(Counter) for i in range(1, n)}
        self.totals: dict[int, dict[tuple[int, ...], int]] = {i: {} for i in range(1, n)}
        self.tokens = 0

    # --- building --------------------------------------------------------------------------------
    def add(self, ids: Sequence[int]) -> None:
        ids = [int(t) for t in ids]
        self.tokens += len(ids)
        for pos in range(1, len(ids)):
            nxt = ids[pos]
            for i in range(1, min(self.n - 1, pos) + 1):
                self.tables[i][tuple(ids[pos - i:pos])][nxt] += 1

    def finalize(self) -> "NGramModel":
        self.totals = {i: {ctx: sum(c.values()) for ctx, c in table.items()}
                       for i, table in self.tables.items()}
        return self

    @classmethod
    def build(cls, sequences: Iterable[Sequence[int]], n: int,
              tokenizer_info: dict[str, object] | None = None) -> "NGramModel":
        model = cls(n, tokenizer_info)
        for seq in sequences:
            model.add(seq)
        return model.finalize()

    # --- storage ---------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        tables = {str(i): {" ".join(map(str, ctx)): {str(t): c for t, c in nxt.items()}
                           for ctx, nxt in table.items()}
                  for i, table in self.tables.items()}
        Path(path).write_text(json.dumps({"format": FORMAT, "n": self.n, "tokens": self.tokens,
                                          "tokenizer": self.tokenizer, "tables": tables}))

    @classmethod
    def load(cls, path: str | Path) -> "NGramModel":
        path = Path(str(path)).expanduser()
        if not path.is_file():
            raise UserError(f"n-gram file {path} does not exist (make one with "
                            f"`tokctl decode build-ngram`, then pass its ngram.json)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise UserError(f"{path} is not an n-gram file from `tokctl decode build-ngram` "
                            f"({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f"{path} is not an n-gram file from `tokctl decode build-ngram` "
                            f"(no format {FORMAT!r})")
        model = cls(int(data["n"]), data.get("tokenizer") or {})
        model.tokens = int(data.get("tokens", 0))
        for i, table in data["tables"].items():
            dest = model.tables[int(i)]
            for ctx, nxt in table.items():
                dest[tuple(int(t) for t in ctx.split())] = Counter(
                    {int(t): int(c) for t, c in nxt.items()})
        return model.finalize()

    def check_tokenizer(self, tokenizer, path: object = "the n-gram file") -> None:
        """A one-line error when the ids were counted with another tokenizer."""
        mine = tokenizer_fingerprint(tokenizer)
        theirs = self.tokenizer
        if theirs.get("sha1") != mine["sha1"]:
            raise UserError(
                f"{path} was built with another tokenizer ({theirs.get('name') or '?'}, "
                f"{theirs.get('vocab_size')} tokens) than this model's ({mine['name'] or '?'}, "
                f"{mine['vocab_size']} tokens): rebuild it with `tokctl decode build-ngram` "
                f"and the same model=")

    # --- lookups ---------------------------------------------------------------------------------
    def mixed_probs(self, contexts: Sequence[Sequence[int]], candidates: Sequence[int],
                    weights: Sequence[float]) -> torch.Tensor:
        """[len(contexts), len(candidates)]: sum over context lengths i (weights[i-1]) of
        P_i(candidate | last i tokens); lengths whose context was never seen add nothing."""
        out = torch.zeros(len(contexts), len(candidates), dtype=torch.float64)
        for r, seq in enumerate(contexts):
            for i, w in enumerate(weights[: self.n - 1], 1):
                if len(seq) < i or w == 0:
                    continue
                ctx = tuple(seq[-i:])
                nxt = self.tables[i].get(ctx)
                if not nxt:
                    continue
                scale = w / self.totals[i][ctx]
                for j, c in enumerate(candidates):
                    hits = nxt.get(c)
                    if hits:
                        out[r, j] += scale * hits
        return out

    def stats(self) -> dict[str, object]:
        return {"n": self.n, "tokens": self.tokens,
                "contexts": {str(i): len(t) for i, t in self.tables.items()}}
