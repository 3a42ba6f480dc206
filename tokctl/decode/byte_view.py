"""The exact next-byte distribution of a token-level model (Phan et al., 2024, "Exact Byte-Level
Probabilities from Tokenized Language Models": the Byte-Token Representation Lemma).

The probability that a text starts with the bytes x is the total probability of its *cover
encodings*: the token sequences whose bytes run past the end of x (or reach it exactly) and agree
with x on the way. So P(next byte = c | x) = P(cover of xc) / P(cover of x), and a model over
tokens becomes a model over bytes with no training, whatever its prompt's last token.

The covers are kept as a few *nodes*: a node is one token sequence S ending inside the text at
byte ``end``, with its probability and the model's next-token distribution after it. Its covers
of the text x are S + [t] for every token t whose bytes start with x[end:] (one contiguous range
of the byte-sorted vocabulary). A token that spells x[end:] exactly ends a new node at the end of
the text, which costs one model call (a chain of the tokens since the anchor, run as a tree with
the others of that step and dropped from the KV cache afterwards). Generating byte by byte, the
nodes carry over: each new byte narrows every node's range and adds at most one node, so a byte
costs at most one model call, usually of a few tokens.

What "exact" means. The model is restricted to canonical encodings (those the tokenizer itself
produces): after every node, the tokens that would make a non-canonical sequence are removed and
the rest renormalised. The byte distribution is then exactly the byte marginal of that process,
end of text (EOS) included as outcome 256. ``prune`` > 0 trades exactness for speed in two ways,
each bounded by ``prune`` of the probability mass at a step: new nodes are not run (no model
call) and old nodes are dropped, from the least likely up, while their total share stays within
``prune`` (a byte that only they could spell, as when scoring a given text, runs the passed-over
new nodes after all, or failing that reads the text afresh); and a node's tokens are
checked for canonicity from the most likely down only until the unchecked rest holds at most
``prune`` of the step's mass (at most ``max_checks`` tokens), the rest kept unchecked.
``prune=0`` is exact and checks every token.

The anchor. Canonicity is judged by encoding the bytes from an *anchor*: a point every cover
shares, where the tokenizer's pre-tokenisation always splits (a whitespace byte after a non-space
byte, as Phan et al. choose, or the start of the text after a special token). The tokens before
the anchor are the fixed context; the anchor moves forward as all nodes come to agree on the
tokens before a later such point (those are then committed to the KV cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from tokctl.decode.byte_vocab import token_bytes
from tokctl.errors import UserError

EOS = 256  # the outcome "the text ends here"
SPACES = frozenset(b" \t\n\r\x0b\x0c")
MODES = ("exact", "heal", "pinned")


@dataclass
class Node:
    tokens: tuple[int, ...]  # since the anchor
    end: int  # where its bytes end, as an offset into the view's bytes
    logw: float  # log probability of the sequence, up to a constant shared by all nodes
    p: torch.Tensor  # next-token distribution after it (canonical, renormalised), float64 [V]


class ByteView:
    """A token-level model (a decode :class:`~tokctl.decode.target.Target`) seen one byte at a time.

    ``start(ids, mode)`` sets the prompt (token ids); ``distribution()`` gives the next-byte
    distribution (257 entries, the last the end of text); ``append(byte)`` moves on by one byte.
    ``next_byte_distribution(prompt_bytes)`` does both from bytes, reusing the nodes when the
    prompt extends the previous one.

    Modes of ``start``: ``exact`` reinterprets the prompt's bytes from its last anchor (any
    tokenisation of its end); ``heal`` keeps all tokens but the last and requires the first new
    token to extend the last token's bytes (token healing); ``pinned`` keeps every prompt token
    (the naive way, the prompt's tokenisation as it is)."""

    def __init__(self, target, tokenizer, eos_ids: Iterable[int] = (), prune: float = 1e-4,
                 max_checks: int = 1024):
        if not 0 <= float(prune) < 1:
            raise UserError(f"prune={prune} must be in [0, 1)")
        self.target = target
        self.vocab = token_bytes(tokenizer, target.vocab_size)
        self.prune = float(prune)
        self.max_checks = int(max_checks)
        eos = sorted(int(e) for e in eos_ids if 0 <= int(e) < target.vocab_size)
        self.eos = torch.tensor(eos, dtype=torch.long)
        allowed = self.vocab.has_bytes.clone()
        allowed[self.eos] = True
        self.allowed = allowed.double()
        self.nodes: list[Node] = []
        self.data = bytearray()  # the bytes from the first anchor on
        self.anchor = 0
        self.pending: list[int] = []  # tokens before the anchor not yet in the KV cache
        self.root_logits: torch.Tensor | None = None
        self._dist: torch.Tensor | None = None
        self._seen: bytes | None = None  # the prompt next_byte_distribution last answered
        self._vecs: list[torch.Tensor] = []  # each node's share of the last distribution
        self._dormant: list[tuple[tuple[int, ...], float]] = []  # new nodes pruning passed over
        self._top = self._total = 0.0
        self.context_ids: list[int] = []  # the tokens in the KV cache
        self.context_length = 0
        self.room = 512
        self.capacity = 0

    # --- the model side --------------------------------------------------------------------------
    @property
    def calls(self) -> int:
        return self.target.forward_calls

    def _forward(self, seqs: Iterable[tuple[int, ...]]) -> dict[tuple[int, ...], torch.Tensor]:
        """Logits after each sequence (and after each of its prefixes), all token sequences from
        the anchor, in one forward pass; the pending tokens go first and are committed."""
        tokens: list[int] = []
        parents: list[int] = []
        for t in self.pending:
            parents.append(len(tokens) - 1)
            tokens.append(t)
        index: dict[tuple[int, ...], int] = {(): len(tokens) - 1}
        for seq in sorted(set(seqs), key=len):
            for i in range(1, len(seq) + 1):
                if seq[:i] not in index:
                    index[seq[:i]] = len(tokens)
                    parents.append(index[seq[: i - 1]])
                    tokens.append(seq[i - 1])
        if self.context_length + len(tokens) > min(self.capacity, self.target.max_positions - 1):
            raise ContextFull()
        if not tokens:
            return {(): self.root_logits}
        logits = self.target.forward(tokens, parents)
        self.target.commit(list(range(len(self.pending))))
        self.context_length += len(self.pending)
        self.context_ids += self.pending
        if self.pending:
            self.root_logits = logits[len(self.pending) - 1]
            self.pending = []
        return {seq: (logits[i] if i >= 0 else self.root_logits) for seq, i in index.items()}

    def _expand(self, seq: tuple[int, ...], logits: torch.Tensor, share: float) -> torch.Tensor:
        """The canonical next-token distribution after ``seq``: the model's, less the special
        tokens (but EOS) and the tokens that would make ``seq`` non-canonical, renormalised."""
        p = torch.softmax(logits.double(), -1)[: self.vocab.size] * self.allowed
        total = float(p.sum())
        if total <= 0:
            return p
        if self.prune > 0:
            tol = self.prune / max(share, self.prune) * total
            top = torch.topk(p, min(self.max_checks, p.numel()))
            rest = total - torch.cumsum(top.values, 0)
            k = int((rest > tol).sum()) + 1
            cand = top.indices[: min(k, top.indices.numel())]
        else:
            cand = torch.nonzero(p > 0).view(-1)
        cand = [int(t) for t in cand if bool(self.vocab.has_bytes[t])]
        prefix = bytes(self.data[self.anchor: self.anchor + self._length(seq)])
        ok = self.vocab.canonical(seq, prefix, cand)
        bad = [t for t, good in zip(cand, ok) if not good]
        if bad:
            p[torch.tensor(bad, dtype=torch.long)] = 0.0
        z = float(p.sum())
        return p / z if z > 0 else p

    def _length(self, seq: tuple[int, ...]) -> int:
        return sum(len(self.vocab.bytes[t]) for t in seq)

    # --- starting --------------------------------------------------------------------------------
    def start(self, ids: list[int], mode: str = "exact", room: int = 512) -> None:
        """Condition on the prompt ``ids``; ``room``: tokens the KV cache keeps free beyond it."""
        if mode not in MODES:
            raise ValueError(f"mode={mode} is not one of {MODES}")
        ids = [int(t) for t in ids]
        if not ids:
            raise UserError("empty prompt: nothing to decode from")
        tb = self.vocab.bytes
        region = max((i + 1 for i, t in enumerate(ids) if not tb[t]), default=0)
        if mode == "pinned":
            cut = len(ids)
        elif mode == "heal":
            cut = len(ids) - 1 if len(ids) - 1 >= max(region, 1) else len(ids)
        else:
            cut = self._anchor_index(ids, region)
        context, rest = ids[:cut], ids[cut:]
        self.data = bytearray(b"".join(tb[t] for t in rest))
        seqs = self._prompt_sequences() if mode == "exact" else set()
        self.anchor = 0
        self.pending = []
        self._dist = None
        # room for the generated bytes' tokens, the prompt's tokenisations and one step's tree
        self.capacity = len(context) + room + len(seqs)
        self.root_logits = self.target.prefill(context, capacity=self.capacity)
        self.context_length = len(context)
        self.context_ids = list(context)
        self.room = room
        root = Node((), 0, 0.0, self._expand((), self.root_logits, 1.0))
        if not seqs:
            self.nodes = [root]
            return
        logits = self._forward(seqs)
        nodes = {(): root}
        for seq in sorted(seqs, key=len):
            parent = nodes.get(seq[:-1])
            if parent is None or parent.p[seq[-1]] <= 0:
                continue
            logw = parent.logw + math.log(float(parent.p[seq[-1]]))
            nodes[seq] = Node(seq, self._length(seq), logw,
                              self._expand(seq, logits[seq], math.exp(min(0.0, logw))))
        self.nodes = list(nodes.values())

    def _prompt_sequences(self) -> set[tuple[int, ...]]:
        """Every prefix of the canonical encodings of the prompt's bytes from the anchor up to
        each of its byte offsets: the token sequences that may end inside the prompt."""
        tb = self.vocab.bytes
        seqs = set()
        for m in range(1, len(self.data) + 1):
            try:
                text = bytes(self.data[:m]).decode("utf-8")
            except UnicodeDecodeError:
                continue
            enc = tuple(self.vocab.encode(text))
            if b"".join(tb[t] for t in enc) == bytes(self.data[:m]):
                seqs.update(enc[:i] for i in range(1, len(enc) + 1))
        return seqs

    def _anchor_index(self, ids: list[int], region: int) -> int:
        """The last token boundary of the prompt that is an anchor (a whitespace byte after a
        non-space byte, or the start of the text after a special token), keeping at least one
        token of context."""
        tb = self.vocab.bytes
        best = None
        for j in range(max(region, 1), len(ids)):
            if j == region:
                best = j
                continue
            prev, nxt = tb[ids[j - 1]], tb[ids[j]]
            if nxt[:1] and nxt[0] in SPACES and prev[-1:] and prev[-1] not in SPACES:
                best = j
        return best if best is not None else min(max(region, 1), len(ids))

    def next_byte_distribution(self, prompt: bytes) -> torch.Tensor:
        """P(next byte | prompt) over 257 outcomes (bytes 0-255, then the end of the text), from
        the prompt's bytes alone; a prompt that extends the last one reuses its nodes."""
        prompt = bytes(prompt)
        if self._seen is not None and prompt.startswith(self._seen) and self.nodes:
            for b in prompt[len(self._seen):]:
                self.append(b)
        else:
            self.start(self.ids_for(prompt), "exact", room=len(prompt) + 512)
        self._seen = prompt
        return self.distribution()

    def ids_for(self, prompt: bytes) -> list[int]:
        """Token ids of a prompt given as bytes, after the tokenizer's BOS if it adds one."""
        tok = self.vocab.tokenizer
        bos = list(tok("", add_special_tokens=True)["input_ids"])
        ids = bos + self.encode_bytes(prompt)
        if not ids:
            raise UserError("empty prompt: nothing to decode from")
        return ids

    def encode_bytes(self, data: bytes) -> list[int]:
        """Bytes as tokens: the longest UTF-8 part encoded, the bytes after it as byte tokens."""
        cut = len(data)
        while cut > 0:
            try:
                text = data[:cut].decode("utf-8")
                break
            except UnicodeDecodeError:
                cut -= 1
        ids = self.vocab.encode(text) if cut else []
        for b in data[cut:]:
            single = self.vocab.single_byte.get(b)
            if single is None:
                raise UserError(f"byte 0x{b:02x} is not valid UTF-8 here and this tokenizer "
                                f"has no token for it alone")
            ids.append(single)
        return ids

    # --- one byte at a time ----------------------------------------------------------------------
    def distribution(self) -> torch.Tensor:
        """P(next byte | the bytes so far), float64 [257]."""
        if self._dist is None:
            self._dist = self._compute()
        return self._dist

    def _contribution(self, node: Node, n: int) -> tuple[torch.Tensor, list[tuple[int, float]]]:
        """A node's weights on the next byte (bin 256: end of text) and the tokens that spell its
        remaining bytes exactly (new nodes), with their probabilities."""
        vec = torch.zeros(258, dtype=torch.float64)
        k = n - node.end
        if k == 0:
            vec.scatter_add_(0, self.vocab.first_byte, node.p)
            vec[257] = 0.0
            vec[EOS] = node.p[self.eos].sum() if self.eos.numel() else 0.0
            return vec, []
        lo, hi = self.vocab.prefix_range(bytes(self.data[node.end:n]))
        if hi <= lo:
            return vec, []
        ids = self.vocab.sorted_ids[lo:hi]
        probs = node.p[ids]
        longer = self.vocab.sorted_len[lo:hi] > k
        vec.scatter_add_(0, self.vocab.byte_at(lo, hi, k)[longer], probs[longer])
        exact = [(int(t), float(q)) for t, q in zip(ids[~longer], probs[~longer]) if q > 0]
        return vec, exact

    def _compute(self) -> torch.Tensor:
        n = len(self.data)
        top = max(node.logw for node in self.nodes)
        vecs, spawn = [], []
        for node in self.nodes:
            vec, exact = self._contribution(node, n)
            vecs.append(vec * math.exp(node.logw - top))
            spawn += [(node.logw + math.log(q), node.tokens + (t,)) for t, q in exact]
        known = {node.tokens for node in self.nodes}
        spawn = sorted({seq: lw for lw, seq in spawn if seq not in known}.items(),
                       key=lambda item: item[1])
        total = sum(float(v.sum()) for v in vecs) + sum(math.exp(lw - top) for _, lw in spawn)
        if total <= 0:
            raise RuntimeError("no token sequence covers these bytes")
        budget = self.prune * total
        self._dormant = []  # the least likely new nodes: not worth a model call unless needed
        while spawn and math.exp(spawn[0][1] - top) <= budget:
            budget -= math.exp(spawn[0][1] - top)
            self._dormant.append(spawn.pop(0))
        self._vecs, self._top, self._total = vecs, top, total
        self._spawn(spawn)
        dist = torch.stack(self._vecs).sum(0)[:257]
        return dist / dist.sum()

    def _spawn(self, spawn: list[tuple[tuple[int, ...], float]]) -> None:
        """New nodes ending at the end of the text, in one model call."""
        if not spawn:
            return
        n = len(self.data)
        logits = self._forward(seq for seq, _ in spawn)
        for seq, lw in spawn:
            node = Node(seq, n, lw, self._expand(seq, logits[seq],
                                                 math.exp(lw - self._top) / self._total))
            vec, _ = self._contribution(node, n)
            self._vecs.append(vec * math.exp(lw - self._top))
            self.nodes.append(node)

    def probability(self, byte: int) -> float:
        """P(next byte = ``byte``). Where pruning left it no sequence, the new nodes it passed
        over are run after all, and the distribution is recomputed with them."""
        q = float(self.distribution()[byte])
        if q <= 0 and self._dormant:
            self._spawn(self._dormant)
            self._dormant = []
            dist = torch.stack(self._vecs).sum(0)[:257]
            self._dist = dist / dist.sum()
            q = float(self._dist[byte])
        return q

    def append(self, byte: int) -> None:
        """Move on by one byte. The nodes that give it no probability are gone; of the others,
        the least likely are dropped while their share of its probability stays within
        ``prune``. A byte that the kept nodes cannot spell restarts the view from the text."""
        byte = int(byte)
        if not 0 <= byte < 256:
            raise ValueError(f"{byte} is not a byte")
        if self.probability(byte) <= 0:
            self.restart()
            if self.probability(byte) <= 0:
                raise ValueError(f"byte 0x{byte:02x} has probability 0 here")
        mass = [float(v[byte]) for v in self._vecs]
        budget = self.prune * sum(mass)
        drop = set()
        for i in sorted(range(len(mass)), key=mass.__getitem__):
            if mass[i] > budget and mass[i] > 0:
                break
            budget -= mass[i]
            drop.add(i)
        self.nodes = [node for i, node in enumerate(self.nodes) if i not in drop]
        self.data.append(byte)
        self._dist = None
        self._advance()

    def restart(self) -> None:
        """Read the text so far afresh, with every tokenisation of its end (after pruning has
        dropped the only sequences that spell a byte to come)."""
        head = self.encode_bytes(bytes(self.data[self.anchor:]))
        self.start(self.context_ids + self.pending + head, "exact", room=self.room)

    def _advance(self) -> None:
        """Move the anchor to the last anchor point on which every node agrees (same tokens
        before it); those tokens join the context."""
        d, n = self.data, len(self.data)
        for p in range(n - 1, self.anchor, -1):
            if d[p] not in SPACES or d[p - 1] in SPACES:
                continue
            need, head = p - self.anchor, None
            for node in self.nodes:
                if node.end < p:
                    break
                c = run = 0
                while run < need:
                    run += len(self.vocab.bytes[node.tokens[c]])
                    c += 1
                if run != need or (head is not None and node.tokens[:c] != head):
                    break
                head = node.tokens[:c]
            else:
                if head is None:
                    return
                self.pending += list(head)
                self.anchor = p
                for node in self.nodes:
                    node.tokens = node.tokens[len(head):]
                return

    @property
    def text(self) -> bytes:
        """The bytes from the first anchor on (the prompt's reinterpreted end and what followed)."""
        return bytes(self.data)


class ContextFull(Exception):
    """The model's context has no room for the next step."""


def loglik(view: ByteView, continuation: bytes) -> float:
    """Log-likelihood (nats) of ``continuation`` after the view's current bytes, byte by byte
    (the view moves on past it); -inf where a byte has probability 0."""
    return loglik_combined([view], [1.0], "mixture", continuation)


def loglik_combined(views: list[ByteView], weights: list[float], how: str,
                    continuation: bytes) -> float:
    """The same for several views whose distributions are combined (see :func:`combine`)."""
    total = 0.0
    for b in continuation:
        for v in views:
            if v.probability(b) <= 0:
                v.restart()  # pruning dropped every sequence that spells it: read afresh
        q = float(combine([v.distribution() for v in views], weights, how)[b])
        if q <= 0:
            return float("-inf")
        total += math.log(q)
        for v in views:
            v.append(b)
    return total


def combine(dists: list[torch.Tensor], weights: list[float], how: str) -> torch.Tensor:
    """Next-byte distributions of several models as one: a mixture (weighted mean) or a product
    of experts (weighted geometric mean, renormalised)."""
    if len(dists) == 1:
        return dists[0]
    if how == "mixture":
        out = sum(w * d for w, d in zip(weights, dists))
    else:
        logs = sum(w * torch.log(d) for w, d in zip(weights, dists) if w > 0)
        out = torch.exp(logs - logs.max())
    return out / out.sum()


def choose_byte(dist: torch.Tensor, sampling, generator: torch.Generator | None) -> int:
    """One outcome (a byte, or :data:`EOS`) from a next-byte distribution, greedy or sampled with
    the run's temperature, top-k and top-p applied to the bytes."""
    from tokctl.decode.sampling import choose

    return choose(torch.log(dist.float()), sampling, generator)
