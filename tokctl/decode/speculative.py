"""The draft-and-verify engine every speculative method shares.

One step: the method proposes a draft tree that hangs below the *root*, the token the target
already chose at the end of the previous step (known, not yet in the KV cache). The target runs
the root and the whole tree in one forward pass (tree attention mask, tree position ids), the
verifier walks the tree from the root, accepting children the target agrees with, and returns the
path and one more token chosen by the target (the *bonus*) which becomes the next root. The path's
KV entries are committed, the rest dropped; the prefix is never recomputed.

Verification rules (all lossless):

- greedy (temperature 0): follow the child equal to the target's argmax.
- drafts without probabilities (lookup, recycling, top-k trees): sample the target's own token at
  each node and follow the child equal to it, which is exactly sampling from the target.
- drafts whose children were *sampled* from a draft distribution q: speculative sampling in its
  multi-candidate form: try children in turn, accept x with probability min(1, p(x)/q(x)), on
  rejection replace p by the normalised residual max(p - q, 0) (and, for children drawn without
  replacement, remove x from q and renormalise: recursive rejection sampling); if every child is
  rejected, the bonus is drawn from the final residual.
- SpecTr's k-sequential selection for k i.i.d. drafts (see :func:`kseq_select`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokctl.decode.base import DecodingMethod, Generation, append_tokens
from tokctl.decode.sampling import Sampling, Settings, choose, probs, sample

# How a node's children were produced, which decides how they are verified.
DETERMINISTIC = "deterministic"  # chosen by rule (lookup, top-k): verify against target samples
IID = "iid"  # sampled i.i.d. from q (multi-draft speculative sampling)
WITHOUT_REPLACEMENT = "without_replacement"  # sampled without replacement from q (RSD)
KSEQ = "kseq"  # i.i.d. drafts verified with SpecTr's k-sequential selection


@dataclass
class Draft:
    """A draft tree below the root. ``parents[i]`` is the index of node i's parent in this draft,
    or -1 when node i is a child of the root; parents come before children.

    For sampled drafts, ``q[u]`` is the draft distribution node u's children were drawn from
    (u = -1 for the root), and ``draws[u]`` the drawn tokens in order, duplicates included; the
    tree holds each distinct token once.
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    scheme: str = DETERMINISTIC
    q: dict[int, torch.Tensor] = field(default_factory=dict)
    draws: dict[int, list[int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int) -> int:
        self.tokens.append(int(token))
        self.parents.append(int(parent))
        return len(self.tokens) - 1

    def children(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i, p in enumerate(self.parents):
            out.setdefault(p, []).append(i)
        return out



def _normalise(p: torch.Tensor) -> torch.Tensor:
    s = p.sum()
    if s <= 0:
        raise FloatingPointError("residual distribution vanished")
    return p / s


def _sample(p: torch.Tensor, generator) -> int:
    return int(sample(p, generator))


def kseq_rho(p: torch.Tensor, q: torch.Tensor, k: int, iters: int = 30) -> float:
    """The smallest rho in [1, k] for which SpecTr's k-sequential selection stays lossless.

    Each draft is accepted with probability min(1, p/(rho q)); with a(y) = min(q(y), p(y)/rho) and
    beta = sum(a), the accepted token has law a/beta and some draft is accepted with probability
    1 - (1 - beta)^k. The residual is a distribution iff p >= a (1 - (1-beta)^k) / beta, which
    holds for every y when rho >= (1 - (1-beta)^k) / beta. Bisection on that condition.
    """

    def ok(rho: float) -> bool:
        beta = float(torch.minimum(q, p / rho).sum())
        if beta <= 0:
            return True
        return rho >= (1 - (1 - beta) ** k) / beta - 1e-9

    lo, hi = 1.0, float(k)
    if ok(lo):
        return lo
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def kseq_select(p: torch.Tensor, q: torch.Tensor, draws: list[int], generator) -> tuple[int, bool]:
    """SpecTr's k-sequential selection over i.i.d. draws from q. Returns (token, accepted)."""
    k = len(draws)
    rho = kseq_rho(p, q, k)
    for x in draws:
        ratio = float(p[x]) / (rho * float(q[x])) if q[x] > 0 else float("inf")
        if float(torch.rand((), generator=generator)) < min(1.0, ratio):
            return x, True
    a = torch.minimum(q, p / rho)
    beta = float(a.sum())
    accepted_mass = (1 - (1 - beta) ** k) / beta if beta > 0 else 0.0
    residual = (p - a * accepted_mass).clamp_min(0)
    return _sample(_normalise(residual), generator), False


def verify(draft: Draft, logits: torch.Tensor, sampling: Sampling,
           generator: torch.Generator | None) -> tuple[list[int], int]:
    """Walk the tree. ``logits[0]`` belongs to the root, ``logits[1 + i]`` to draft node i.
    Returns (accepted draft node indices, root to leaf; bonus token).

    Every row is decided at once on the device and reaches the host in one transfer: the argmax
    of each row (greedy), or one sample of the target's distribution at each row (drafts verified
    against the target's own samples; the walk reads the sample of each node it visits, and those
    are independent draws from that node's distribution, so the law is the target's), or the rows'
    distributions for the nodes whose children were sampled from a draft distribution.
    """
    children = draft.children()
    sampled_nodes = (set() if sampling.greedy or draft.scheme == DETERMINISTIC
                     else set(draft.q) & ({-1} | set(range(len(draft)))))
    if sampling.greedy:
        choice = logits.argmax(-1).tolist()
        dist = None
    else:
        p_all = probs(logits, sampling)
        choice = sample(p_all, generator).tolist() if len(sampled_nodes) < len(draft) + 1 else None
        dist = p_all.cpu() if sampled_nodes else None
    path: list[int] = []
    node = -1
    while True:
        kids = children.get(node, [])
        if node in sampled_nodes:
            token, nxt = verify_sampled(draft, node, kids, dist[node + 1], generator)
        else:
            token = choice[node + 1]
            nxt = next((c for c in kids if draft.tokens[c] == token), None)
        if nxt is None:
            return path, token
        path.append(nxt)
        node = nxt


def verify_sampled(draft: Draft, node: int, kids: list[int], p: torch.Tensor,
                   generator) -> tuple[int, int | None]:
    """Verify the children ``kids`` of ``node``, drawn from the draft distribution
    ``draft.q[node]``, against the target distribution ``p`` (:func:`verify`'s rule for sampled
    nodes; LANTERN passes its relaxed p~ instead). Returns (the token chosen at this node, the
    accepted child's index, or None when every child was rejected and the token is the draw
    from the residual)."""
    q = draft.q[node].float().to(p.device)
    draws = draft.draws.get(node) or [draft.tokens[c] for c in kids]
    by_token = {draft.tokens[c]: c for c in kids}
    if draft.scheme == KSEQ:
        token, accepted = kseq_select(p, q, draws, generator)
        return token, by_token.get(token) if accepted else None
    for x in draws:
        qx = float(q[x])
        accept = qx <= 0 or float(torch.rand((), generator=generator)) < min(1.0, float(p[x]) / qx)
        if accept:
            return x, by_token[x]
        p = _normalise((p - q).clamp_min(0))
        if draft.scheme == WITHOUT_REPLACEMENT:
            q = q.clone()
            q[x] = 0
            if q.sum() <= 0:
                break
            q = q / q.sum()
    return _sample(p, generator), None


class SpeculativeMethod(DecodingMethod):
    """Base of every draft-and-verify method: subclasses implement ``propose`` and may implement
    ``observe`` (learn from the verified step) and ``start`` (a new sequence)."""

    name = "speculative"
    wants_prompt_logits = False  # start() receives every prompt position's logits

    def start(self, prompt_ids: list[int], prefill_logits: torch.Tensor) -> None:
        """A new sequence begins (after the target's prefill)."""

    def propose(self, tokens: list[int], settings: Settings, generator) -> Draft:
        """A draft tree below ``tokens[-1]`` (the root: chosen, not yet run by the target)."""
        raise NotImplementedError

    def observe(self, tokens: list[int], draft: Draft, logits: torch.Tensor, path: list[int],
                bonus: int) -> None:
        """After verification: ``logits[0]`` is the root's, ``logits[1 + i]`` draft node i's."""

    def verify(self, draft: Draft, logits: torch.Tensor, sampling: Sampling,
               generator) -> tuple[list[int], int]:
        """The acceptance rule: the lossless :func:`verify`; LANTERN relaxes it."""
        return verify(draft, logits, sampling, generator)

    def generate(self, prompt_ids: list[int], settings: Settings,
                 generator: torch.Generator | None) -> Generation:
        target = self.target
        room = target.max_positions - len(prompt_ids)
        logits = target.prefill(prompt_ids, capacity=len(prompt_ids) + settings.max_new_tokens + 256,
                                all_logits=self.wants_prompt_logits)
        self.start(list(prompt_ids), logits)
        root = choose(logits if logits.dim() == 1 else logits[-1], settings.sampling, generator)
        out: list[int] = []
        accepted_per_step = [1]  # the prefill chose one token
        draft_sizes: list[int] = []
        reason = append_tokens(out, [root], settings)
        tokens = list(prompt_ids) + [root]
        while reason is None:
            if len(out) >= room:
                reason = "context"
                break
            draft = self.propose(tokens, settings, generator)
            # A draft may not run past the context or ask for more than max_new_tokens needs; the
            # bonus token after the accepted path takes the last free slot.
            draft = _clip(draft, min(room, settings.max_new_tokens) - len(out) - 1)
            draft = _cap(draft, getattr(target, "max_block", None), settings.sampling)
            tree_tokens = [tokens[-1]] + draft.tokens
            tree_parents = [-1] + [p + 1 if p >= 0 else 0 for p in draft.parents]
            logits = target.forward(tree_tokens, tree_parents)
            path, bonus = self.verify(draft, logits, settings.sampling, generator)
            target.commit([0] + [i + 1 for i in path])
            self.observe(tokens, draft, logits, path, bonus)
            new = [draft.tokens[i] for i in path] + [bonus]
            before = len(out)
            reason = append_tokens(out, new, settings)
            accepted_per_step.append(len(out) - before)
            draft_sizes.append(len(draft))
            tokens.extend(new)
        return Generation(tokens=out, steps=target.forward_calls, finish_reason=reason,
                          accepted_per_step=accepted_per_step,
                          extra={"mean_draft_size": (sum(draft_sizes) / len(draft_sizes))
                                 if draft_sizes else 0.0})


def _cap(draft: Draft, max_block: int | None, sampling: Sampling) -> Draft:
    """Keep the first ``max_block - 1`` nodes (with the root, one block of a batch-invariant
    target: a larger tree would run in another shape and round differently). Parents precede
    children, so a prefix of the nodes is a tree. Drafts whose sampled draws a cut could orphan
    are left whole."""
    if not max_block or len(draft) < max_block:
        return draft
    if not (sampling.greedy or draft.scheme == DETERMINISTIC):
        return draft
    out = Draft(scheme=draft.scheme)
    for t, p in zip(draft.tokens[: max_block - 1], draft.parents[: max_block - 1]):
        out.add(t, p)
    return out


def _clip(draft: Draft, max_depth: int) -> Draft:
    """Drop nodes deeper than ``max_depth`` (their tokens could not be used)."""
    if max_depth <= 0:
        return Draft(scheme=draft.scheme)
    depth: list[int] = []
    keep: list[int] = []
    for i, p in enumerate(draft.parents):
        d = 1 if p < 0 else depth[p] + 1
        depth.append(d)
        if d <= max_depth:
            keep.append(i)
    if len(keep) == len(draft.tokens):
        return draft
    remap = {old: new for new, old in enumerate(keep)}
    out = Draft(scheme=draft.scheme)
    for i in keep:
        p = draft.parents[i]
        out.add(draft.tokens[i], remap[p] if p >= 0 else -1)
    # A kept node at the depth limit lost all its children: its draws go with them.
    has_kids = {u for u in list(draft.q) + list(draft.draws)
                if u < 0 or (u in remap and depth[u] < max_depth)}
    out.q = {(remap[u] if u >= 0 else -1): v for u, v in draft.q.items() if u in has_kids}
    out.draws = {(remap[u] if u >= 0 else -1): v for u, v in draft.draws.items() if u in has_kids}
    return out
