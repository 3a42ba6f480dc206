"""A small autoregressive prior over a tokenizer's token sequences, and the arithmetic coding of
token ids under it.

The prior is a causal transformer over the code ids (a BOS id, then each token predicts the
next), trained on the tokens of training crops (prior_train.py). A token file coded under it
(tokfile version 2, ``coded``) holds a range-coder stream (``constriction``) of the ids, each
coded with the prior's probability of it given the tokens before it in its tile; the file's
header names the prior by a 24-bit hash of its config and weights. Tokenizers with too many ids
for a softmax over them (vq2d32) have a DigitPrior instead (digit_prior.py), which codes each id's
FSQ digits in turn through the same coder.

Arithmetic coding needs the encoder and decoder to compute the same probabilities bit for bit.
Both run the same loop here (one token a step, a key/value cache, float64), on the same batch
of tiles, so on one machine they agree exactly; across machines, coding_precision.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tokctl.errors import UserError
from tokctl.imagetok.coding_precision import coding_softmax, coding_start
from tokctl.imagetok.digit_prior import DigitPrior
from tokctl.imagetok.layers import Block

FORMAT = "tokctl-imagetok-prior/1"


class PriorBlock(Block):
    """The tokenizers' pre-norm block (same weights), run causally with an optional key/value
    cache (for coding one position at a time)."""

    def forward(self, x: torch.Tensor, cache: list | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` (new rows x cached + new keys, True = may attend): the decoding engine's tree
        verification (prior_target.py); without it new rows see every cached key."""
        b, s, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, w // self.heads).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:  # one new position attends to every earlier one
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, w))
        return x + self.mlp(self.norm2(x))


class TokenPrior(nn.Module):
    """p(t_i | t_<i) over ``vocab`` code ids for sequences of at most ``max_tokens``; with
    ``conditions`` > 0, also p(t_i | t_<i, c) for a cluster c of the training crops (clusters.py):
    the sequence then starts with the id ``vocab + 1 + c`` instead of BOS (LlamaGen's class
    token), and the centroids the clusters were defined by travel with the weights."""

    kind = "ids"

    def __init__(self, vocab: int, max_tokens: int, width: int = 128, layers: int = 3,
                 heads: int = 4, conditions: int = 0):
        super().__init__()
        self.vocab, self.max_tokens, self.conditions = int(vocab), int(max_tokens), int(conditions)
        # id ``vocab`` is BOS (unconditional), ``vocab + 1 + c`` starts a sequence of cluster c
        self.embed = nn.Embedding(self.vocab + 1 + self.conditions, width)
        if self.conditions:
            from tokctl.imagetok.clusters import FEATURES

            self.register_buffer("centroids", torch.zeros(self.conditions, FEATURES))
            self.register_buffer("cluster_share", torch.zeros(self.conditions))
        self.pos = nn.Parameter(torch.randn(self.max_tokens, width) * 0.02)
        self.blocks = nn.ModuleList(PriorBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, self.vocab)

    def start_id(self, condition: int | None = None) -> int:
        """The id a sequence starts with: BOS, or cluster ``condition``'s start id."""
        return self.vocab if condition is None else self.vocab + 1 + int(condition)

    def forward(self, tokens: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n) ids -> (B, n, vocab) logits; position i predicts token i from tokens < i.
        ``start`` (B,): each sequence's first id (default BOS, i.e. unconditional)."""
        b, n = tokens.shape
        first = (torch.full((b, 1), self.vocab, dtype=torch.long, device=tokens.device)
                 if start is None else start.view(b, 1).long())
        x = self.embed(torch.cat([first, tokens[:, :-1]], 1)) + self.pos[:n]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def loss_bits(self, tokens: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n) -> (n,) mean bits per token at each position (cross-entropy in bits)."""
        logits = self.forward(tokens, start)
        ce = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
        return ce.mean(0) / np.log(2)

    def symbols(self, tiles: np.ndarray) -> np.ndarray:
        """What the coder codes, in order: the ids themselves (a DigitPrior codes digits)."""
        return np.asarray(tiles, dtype=np.int64)

    def ids_of_symbols(self, symbols: np.ndarray) -> np.ndarray:
        return symbols

    @torch.no_grad()
    def step_logits(self, prev: torch.Tensor, i: int, caches: list[list]) -> torch.Tensor:
        """Logits (B, vocab) at position ``i`` given the ids (B, 1) just before it, extending the
        blocks' key/value ``caches`` (one list per block, empty at the start)."""
        x = self.embed(prev) + self.pos[i:i + 1]
        for block, cache in zip(self.blocks, caches):
            x = block(x, cache)
        return self.head(self.norm(x))[:, 0]

    def coding_probabilities(self, tokens: np.ndarray | None, n: int,
                             decode_step=None) -> np.ndarray:
        """The probabilities the coder uses: (B, n, vocab) float64, computed one position at a
        time with a cache, in float64, logits rounded to the grid. When encoding, ``tokens``
        (B, n) are known; when decoding, ``decode_step(i, probs (B, vocab)) -> ids (B,)`` gives
        each position's ids from its probabilities before the next step needs them."""
        model, b = coding_start(self, tokens, n, decode_step)
        caches = [[] for _ in model.blocks]
        prev = torch.full((b, 1), model.vocab, dtype=torch.long)
        out = np.zeros((b, n, model.vocab), dtype=np.float64)
        for i in range(n):
            logits = model.step_logits(prev, i, caches)
            probs = coding_softmax(logits)
            out[:, i] = probs
            ids = tokens[:, i] if tokens is not None else decode_step(i, probs)
            prev = torch.as_tensor(np.asarray(ids, dtype=np.int64)).view(b, 1)
        return out


def guided_logits(conditional: torch.Tensor, unconditional: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho and Salimans; LlamaGen's class-conditional sampling): the
    unconditional logits moved ``scale`` times the way the condition moves them (1: the
    conditional prior as it is; > 1 follows the condition more closely, at some diversity)."""
    return unconditional + scale * (conditional - unconditional)


# ------------------------------------------------------------------------------- coding (ids)
def _model():
    import constriction

    return constriction.stream.model.Categorical(perfect=False)


def _coding_table(prior, tiles: np.ndarray, probs: np.ndarray | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(T, n) ids -> the symbols the prior codes (T, S) and their coding probabilities (T, S,
    vocab): ``probs`` when given, else computed."""
    tiles = np.asarray(tiles, dtype=np.int64)
    if probs is None:
        probs = prior.coding_probabilities(tiles, tiles.shape[1])
    return prior.symbols(tiles), probs


def encode_ids(prior, tiles: np.ndarray, probs: np.ndarray | None = None) -> bytes:
    """(T, n) ids of T tiles -> the range coder's bytes. The prior's symbols (the ids, or a
    DigitPrior's digits) are coded position by position (symbol j of every tile, then j+1), the
    order the batched decoder needs them in. ``probs``: the ids' coding probabilities, when
    already computed."""
    import constriction

    symbols, probs = _coding_table(prior, tiles, probs)
    enc = constriction.stream.queue.RangeEncoder()
    model = _model()
    for j in range(symbols.shape[1]):
        enc.encode(np.ascontiguousarray(symbols[:, j], dtype=np.int32), model,
                   np.ascontiguousarray(probs[:, j]))
    # trailing zero bytes carry nothing: the decoder reads zeros past the end
    return shortest_stream(enc.get_compressed().astype(">u4").tobytes().rstrip(b"\0"), probs,
                           symbols)


def _decoder(data: bytes):
    """A range decoder over ``data``, zeros past its end (the encoder drops trailing zeros)."""
    import constriction

    data = bytes(data) + b"\0" * (-len(data) % 4)
    return constriction.stream.queue.RangeDecoder(
        np.frombuffer(data, dtype=">u4").astype(np.uint32))


def _decodes_to(data: bytes, probs: np.ndarray, tiles: np.ndarray) -> bool:
    """Whether ``data`` decodes to ``tiles`` under the encoder's ``probs``. While every id so far
    matches, the decoder's prior sees the same ids and so computes these same probabilities:
    checking against them is checking what decode_ids would return, without running the prior."""
    dec, model = _decoder(data), _model()
    try:
        return all(np.array_equal(dec.decode(model, np.ascontiguousarray(probs[:, i])),
                                  tiles[:, i]) for i in range(tiles.shape[1]))
    except Exception:  # noqa: BLE001  (a cut the coder rejects is just not a candidate)
        return False


def shortest_stream(data: bytes, probs: np.ndarray, tiles: np.ndarray) -> bytes:
    """The shortest byte string that still decodes to ``tiles``, found from the range coder's
    own. The coder seals its stream with whole 32-bit words of its final state, about two bytes
    more than the information needs; any number inside the final interval decodes the same ids.
    So the stream is cut a byte at a time, each cut tried as is (rounded down) and with its last
    byte plus one (rounded up), for as long as one of the two still decodes to the same ids. It
    is deterministic in the ids, so encode-decode-encode stays byte-identical."""
    best = data
    for k in range(len(data) - 1, -1, -1):
        cut = [data[:k]]
        up = int.from_bytes(data[:k], "big") + 1
        if k and up < 256 ** k:
            cut.append(up.to_bytes(k, "big"))
        ok = [c.rstrip(b"\0") for c in cut if _decodes_to(c.rstrip(b"\0"), probs, tiles)]
        if not ok:
            break
        best = min(ok, key=len)
    return best


def decode_ids(prior, data: bytes, tiles: int, n: int) -> np.ndarray:
    """The inverse of :func:`encode_ids`: (tiles, n) ids."""
    dec = _decoder(data)
    model = _model()
    out = prior.symbols(np.zeros((tiles, n), dtype=np.int64))

    def step(j: int, probs: np.ndarray) -> np.ndarray:
        out[:, j] = dec.decode(model, probs)
        return out[:, j]

    step.batch = tiles
    prior.coding_probabilities(None, n, decode_step=step)
    return prior.ids_of_symbols(out)


def ideal_bits(prior, tiles: np.ndarray, probs: np.ndarray | None = None) -> np.ndarray:
    """-log2 p of each coded symbol of (T, n) ids under the coding probabilities (``probs``, when
    already computed): (T, symbols) bits."""
    symbols, probs = _coding_table(prior, tiles, probs)
    t, s = symbols.shape
    return -np.log2(probs[np.arange(t)[:, None], np.arange(s)[None, :], symbols])


# ------------------------------------------------------------------------------------- files
def prior_hash(config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> int:
    from tokctl.imagetok.checkpoint import tokenizer_hash

    return tokenizer_hash({"prior": config}, state_dict)


class LoadedPrior:
    def __init__(self, model: TokenPrior, config: dict, hash24: int, tokenizer_hash: int,
                 path: Path, trained: dict):
        self.model, self.config, self.hash, self.path, self.trained = model, config, hash24, path, trained
        self.tokenizer_hash = tokenizer_hash


def build_prior(config: dict[str, Any]):
    """A TokenPrior over ids, or (``kind: digits``) a DigitPrior over FSQ digits."""
    args = {k: v for k, v in config.items() if k not in ("name", "kind")}
    if config.get("kind") == "digits":
        return DigitPrior(**args)
    return TokenPrior(**args)


def save_prior(path: Path | str, model: TokenPrior, config: dict, tokenizer_hash: int,
               trained: dict) -> None:
    from tokctl.runs import atomic_torch_save

    state = {k: (v.half() if v.is_floating_point() else v).clone()
             for k, v in model.state_dict().items()}
    atomic_torch_save({"format": FORMAT, "prior": config, "tokenizer_hash": int(tokenizer_hash),
                       "state_dict": state, "trained": trained}, path)


def load_prior(path: Path | str) -> LoadedPrior:
    path = Path(path)
    if path.is_dir():
        path = path / "prior.pt"
    if not path.exists():
        raise UserError(f"{path}: no such prior file (give a prior.pt from `tokctl tokenize-image "
                        f"prior train` or its run folder)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{path}: not a readable prior file ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path}: not a tokctl token prior ({FORMAT} expected)")
    model = build_prior(payload["prior"])
    # the shipped fp16 weights, widened: the hash and the coding probabilities both follow them
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in payload["state_dict"].items()})
    model.eval()
    return LoadedPrior(model, payload["prior"], prior_hash(payload["prior"], payload["state_dict"]),
                       payload["tokenizer_hash"], path, payload.get("trained", {}))


def shipped_priors() -> list[Path]:
    from tokctl.imagetok.checkpoint import WEIGHTS_DIR

    return sorted(WEIGHTS_DIR.glob("*.prior.pt"))


def prior_for(tokenizer_hash: int, path: Path | str | None = None) -> LoadedPrior | None:
    """The prior given (it must be for this tokenizer), else the shipped one for it, else None."""
    if path is not None:
        prior = load_prior(path)
        if prior.tokenizer_hash != tokenizer_hash:
            raise UserError(f"--prior {path}: trained on another tokenizer's tokens (hash "
                            f"{prior.tokenizer_hash:06x}; this tokenizer is {tokenizer_hash:06x})")
        return prior
    for p in shipped_priors():
        prior = load_prior(p)
        if prior.tokenizer_hash == tokenizer_hash:
            return prior
    return None


def prior_by_hash(hash24: int, given: Path | str | None = None) -> LoadedPrior | None:
    """The prior whose hash a coded file names: the one given, or a shipped one."""
    for p in ([Path(given)] if given is not None else []) + shipped_priors():
        prior = load_prior(p)
        if prior.hash == hash24:
            return prior
    return None
