"""The token prior (prior.py) as a decoding-engine target, so that `ar`, the drafting methods and
LANTERN (decode/methods/*.py) run on image tokens through the same engine as on text.

Why an adapter and not a prior retrained as a Hugging Face Llama: the shipped prior
(weights/default.prior.pt) is a TokenPrior, and the engine needs only three operations of a
target (prefill, a tree forward after the committed prefix, commit): about a hundred lines over
the prior's own weights, against retraining (CPU hours here) and a second prior format.

A sequence is ``[BOS] + code ids`` (BOS is id ``vocab``, which the prior embeds but never
predicts), or a conditional prior's cluster start id and the codes. Input position i uses the
prior's position embedding i, as in :meth:`TokenPrior.forward`. With classifier-free guidance
(``guidance`` != 1) every forward also runs the same sequence started by BOS, as a second row
of the batch (its own cache rows), and returns the guided logits (prior.guided_logits).

Why a functional forward (:func:`_block`) beside :class:`PriorBlock`'s: the prior is tiny (a
forward is a few dozen operations on 96-wide rows), so its cost here is per-operation dispatch,
not arithmetic, and a generation runs 64 such steps: the module calls, a key/value cache grown
by concatenation, a mask and a position tensor built every step cost as much as the arithmetic.
Here the weights are read once, the cache is one preallocated tensor (every layer's keys and
values, written in place: committing a chain is moving the length, committing a tree path one
gather), and a one-token step (:meth:`PriorTarget.step`: `ar`, a draft model's chain) builds no
tensor at all. It computes what PriorBlock.forward computes (a test compares the two).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokctl.decode.target import Target, tree_positions_and_mask
from tokctl.imagetok.prior import TokenPrior, guided_logits
from tokctl.kernels.tree_attention import allowed_mask


def _linear(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(bias, weight transposed and contiguous) for ``torch.addmm(bias, x, weight_t)``: on rows
    this narrow, half the time of F.linear (which multiplies by the transpose of the stored
    weight) for one row and for a few."""
    return layer.bias.detach(), layer.weight.detach().t().contiguous()


def _layer_weights(block) -> tuple:
    """A PriorBlock's parameters in :func:`_block`'s order. A snapshot: the linear layers'
    weights are copied (transposed), so the target computes with the weights the prior had
    when the target was made (a loaded prior's do not change)."""
    norm = lambda n: (n.weight.detach(), n.bias.detach(), n.eps)  # noqa: E731
    return (norm(block.norm1), _linear(block.qkv), _linear(block.proj), norm(block.norm2),
            _linear(block.mlp[0]), _linear(block.mlp[2]), block.heads)


def _block(x: torch.Tensor, weights: tuple, kv: torch.Tensor, start: int,
           mask: torch.Tensor | None) -> torch.Tensor:
    """PriorBlock.forward for ``n`` new rows of each of the cache's ``b`` sequences, ``x``
    (b * n, width), at positions ``start``.. : their keys and values are written into ``kv``
    (2, b, heads, capacity, head width) in place, and they attend to every entry before them
    (``mask``, (n, start + n): True or 0 = may attend; the causal or tree mask among the new
    rows; None: all). Attention runs on 4-d tensors: SDPA's fused CPU kernel takes those (3-d
    ones go to a slower path, twice the time here)."""
    (n1w, n1b, eps1), qkv_lin, proj_lin, (n2w, n2b, eps2), in_lin, out_lin, heads = weights
    b = kv.shape[1]
    n, width = x.shape[0] // b, x.shape[1]
    end = start + n
    qkv = torch.addmm(qkv_lin[0], torch.layer_norm(x, (width,), n1w, n1b, eps1), qkv_lin[1])
    qkv = qkv.view(b, n, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # (3, b, heads, n, hw)
    kv[:, :, :, start:end] = qkv[1:]
    y = F.scaled_dot_product_attention(qkv[0], kv[0, :, :, :end], kv[1, :, :, :end],
                                       attn_mask=mask)
    x = x + torch.addmm(proj_lin[0], y.transpose(1, 2).reshape(b * n, width), proj_lin[1])
    h = torch.addmm(in_lin[0], torch.layer_norm(x, (width,), n2w, n2b, eps2), in_lin[1])
    return x + torch.addmm(out_lin[0], F.gelu(h, approximate="tanh"), out_lin[1])


class PriorTarget(Target):
    backend = "prior"

    def __init__(self, prior: TokenPrior, source: str = "prior", guidance: float = 1.0):
        # BOS + max_tokens - 1 inputs predict max_tokens ids; the last id is never an input.
        super().__init__(prior, None, vocab_size=prior.vocab, max_positions=prior.max_tokens + 1)
        self.source = source
        self.bos = prior.vocab
        # Classifier-free guidance for a conditional prior's sequences (prior.guided_logits): every
        # forward also runs the sequence started by BOS instead of its cluster, as a second row.
        self.guidance = float(guidance)
        self.rows = 1 if self.guidance == 1 else 2
        self._layers = [_layer_weights(b) for b in prior.blocks]
        self._embed, self._pos = prior.embed.weight.detach(), prior.pos.detach()
        self._norm = (prior.norm.weight.detach(), prior.norm.bias.detach(), prior.norm.eps)
        self._head = _linear(prior.head)
        self.kv: torch.Tensor | None = None  # (layers, 2, rows, heads, capacity, head width)

    def _reset(self, capacity: int) -> None:
        capacity = max(capacity, self.max_positions)
        if self.kv is None or self.kv.shape[4] < capacity:
            block = self.model.blocks[0]
            width = self._embed.shape[1]
            self.kv = torch.zeros(len(self._layers), 2, self.rows, block.heads, capacity,
                                  width // block.heads, dtype=self.dtype, device=self.device)
            # a chain of n rows from ``start`` attends through row start + i: a slice of one
            # additive causal mask (SDPA would turn a boolean one into this every layer)
            self._kv = list(self.kv)  # per layer (iterating the tensor would unbind it each step)
            self._causal = torch.full((capacity, capacity), float("-inf"), dtype=self.dtype,
                                      device=self.device).triu(1)

    def _embed_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """The input rows of ``tokens`` ((n,) ids, or a slice of the table's ids): (rows * n,
        width); with guidance the unconditional sequence's rows follow (a cluster's start id
        becomes BOS)."""
        x = self._embed[tokens]
        return x if self.rows == 1 else torch.cat([x, self._embed[tokens.clamp(max=self.bos)]])

    def _logits(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """(rows * n, width) -> (n, vocab), or the last row's (1, vocab); guided with two rows."""
        if last_only:
            x = x.view(self.rows, -1, x.shape[-1])[:, -1]
        w, b, eps = self._norm
        bias, weight_t = self._head
        logits = torch.addmm(bias, torch.layer_norm(x, (x.shape[-1],), w, b, eps), weight_t)
        if self.rows == 1:
            return logits
        logits = logits.view(2, -1, logits.shape[-1])
        return guided_logits(logits[0], logits[1], self.guidance)

    # No torch.no_grad(): every tensor here is detached (the weights, the cache), so autograd
    # records nothing anyway, and the context manager costs a few microseconds a call.
    def _run(self, tokens, parents, last_only):
        n, start, last = tokens.numel(), self.length, self.model.max_tokens - 1
        if parents is None and start + n <= last + 1:
            pos, mask = self._pos[start:start + n], None  # a chain: positions in order
            if n > 1:
                mask = self._causal[start:start + n, :start + n]
            # one new row may attend to every cached key: no mask at all (the same attention)
        else:
            if parents is None:
                depth, tree = torch.arange(n, device=self.device), None
            else:
                depth, tree = tree_positions_and_mask(torch.tensor(parents, device=self.device))
            mask = allowed_mask(start, tree, n, device=self.device)
            # Positions past the prior's length occur only in the verify-cost measurement's long
            # random sequences (budget.measure); the cost of a step does not depend on them.
            pos = self._pos[(start + depth).clamp(max=last)]
        x = self._embed_rows(tokens) + (pos if self.rows == 1 else pos.repeat(2, 1))
        for weights, kv in zip(self._layers, self._kv):
            x = _block(x, weights, kv, start, mask)
        return self._logits(x, last_only)

    def step(self, token: int) -> torch.Tensor:
        """``forward([token])`` then ``commit([0])`` with no tensor built: the token's embedding
        row and its position's are slices."""
        if self._pending:
            raise RuntimeError("commit() the previous forward before the next one")
        t, start = int(token), self.length
        p = min(start, self.model.max_tokens - 1)
        if self.rows == 1:
            x = self._embed[t:t + 1] + self._pos[p:p + 1]
        else:
            u = min(t, self.bos)
            x = torch.cat([self._embed[t:t + 1], self._embed[u:u + 1]]) + self._pos[p:p + 1]
        for weights, kv in zip(self._layers, self._kv):
            x = _block(x, weights, kv, start, None)
        self.length += 1
        self.forward_calls += 1
        return self._logits(x)[0]

    def _keep(self, keep):
        if keep == list(range(len(keep))):
            return  # a prefix of the pending entries (every chain, ar): already in place
        start = self.length
        index = torch.tensor(keep, dtype=torch.long, device=self.device) + start
        self.kv[:, :, :, :, start:start + len(keep)] = self.kv.index_select(4, index)


class PriorSource:
    """What a method's ``setup(target, loaded)`` reads of a loaded model: the name that keys the
    verify-cost cache (budget.py), no text tokenizer, and the draft (a smaller prior as a
    PriorSource of its own, for `method=draft`), if any."""

    def __init__(self, source: str, model: TokenPrior | None = None, draft=None):
        self.source, self.tokenizer, self.draft = source, None, draft
        self.model, self.info = model, {}

    def decode_target(self) -> PriorTarget:
        """The draft's own forward (drafter.DraftModel asks a draft that is not a Hugging Face
        model for it)."""
        return PriorTarget(self.model, self.source)
