"""`method=lantern`: relaxed speculative decoding for image-token models (LANTERN, Jang et al.,
ICLR 2025), over any drafting method (``base``).

Visual tokens are often interchangeable: a drafted code whose neighbours in the tokenizer's code
space carry the target's probability makes as good an image. LANTERN therefore accepts a drafted
token x not only when the target would pick x but when it would pick one of x's *latent
neighbourhood* A_{k,delta}(x): the nearest of x's k nearest codes (Euclidean distance between the
quantiser's code vectors, ties by id) whose target probabilities sum to at most delta. Moving
that mass onto x changes the one-step law by exactly that mass in total variation, so the
distribution decoded at each position stays within delta of the target's.

The verification here is the one the official code runs for tree drafts (draft probability
taken as 1, i.e. the base's draft verified against the target's own sample): at each node one
token y is drawn from the target's distribution; the child whose neighbourhood holds y is
accepted (the path continues there), else y is the bonus token. Siblings claim neighbourhoods in
draft order, each skipping codes already claimed or drafted as a sibling, and share one budget
delta (the official code gives each sibling its own, which can move up to delta per sibling):
the node's output law is the target's with the claimed mass moved onto the children, within
delta of it. delta = 0 claims nothing and is the engine's lossless verification exactly.
A draft model's chain (``base=draft``: a smaller prior) comes with its distributions q. By
default they are set aside as above (the chain checked against the target's own samples; each
position's law is then a mixture over x ~ q of laws within delta of the target's, so within
delta). ``draft_probs=true`` uses them, the paper's relaxed speculative sampling: accept x with
probability min(1, p~(x) / q(x)), p~ the target with x's neighbourhood mass moved onto x, else
resample from the normalised max(0, p~ - q). That accepts far more (min(p~, q) summed, against
q(x) p~(x)), and delta = 0 is exact speculative sampling, but p~ depends on the drafted x, so the
decoded law is no longer p~ and its distance from the target is not bounded by delta (exact
computation on random 16-code laws: total variation 0.3-0.4 at delta 0.2).
Greedy decoding (temperature 0) is not relaxed.
"""

from __future__ import annotations

from typing import Any

import torch

from tokctl.decode.sampling import probs, sample
from tokctl.decode.speculative import (DETERMINISTIC, IID, Draft, SpeculativeMethod, verify,
                                       verify_sampled)
from tokctl.errors import UserError


def nearest_codes(vectors: torch.Tensor, k: int) -> torch.Tensor:
    """(V, d) code vectors -> (V, k) ids of each code's k nearest other codes, nearest first
    (ties by id: FSQ grids have many equidistant codes)."""
    d = torch.cdist(vectors.double(), vectors.double())
    d.fill_diagonal_(float("inf"))
    # a stable sort keeps equal distances in id order
    return torch.sort(d, dim=1, stable=True).indices[:, :k]


def neighbourhoods(kids: list[int], p: torch.Tensor, near,
                   delta: float) -> dict[int, int]:
    """token -> index (into ``kids``, draft tokens) of the child that claims it. Each child
    claims itself, then its nearest codes in order while the claimed mass (shared by the
    siblings) stays within ``delta``; codes drafted as siblings or claimed already are skipped.
    ``near``: :func:`nearest_codes`, or its ``.tolist()`` (read a row a node: no tensor reads)."""
    owner = {t: i for i, t in reversed(list(enumerate(kids)))}  # a duplicate token: first child
    moved = 0.0
    if delta <= 0:
        return owner
    for i, x in enumerate(kids):
        if owner.get(x) != i:
            continue
        row = near[x]
        row = row.tolist() if torch.is_tensor(row) else row
        for y, py in zip(row, p[row].tolist()):  # the row's masses in one read
            if y in owner:
                continue
            if moved + py > delta:
                break  # the neighbourhood is a prefix of the nearest codes
            moved += py
            owner[y] = i
    return owner


def moved(p: torch.Tensor, kids: list[int], owner: dict[int, int]) -> torch.Tensor:
    """The relaxed law p~: every claimed code's probability moved onto the drafted code that
    claims it (total variation from p: the claimed mass, at most delta). ``p``: a row on the
    CPU (relaxed_verify's); returned itself when nothing is claimed (callers do not write to
    it)."""
    claimed = [y for y, i in owner.items() if y != kids[i]]
    if not claimed:
        return p
    out = p.clone()
    # element by element through NumPy views of the two tensors: a torch call per element
    # costs more than the rest of a verification step
    o, src = out.numpy(), p.numpy()
    for y in claimed:
        o[kids[owner[y]]] += src[y]
    o[claimed] = 0
    return out


def relaxed_verify(draft: Draft, logits: torch.Tensor, sampling, generator,
                   near, delta: float) -> tuple[list[int], int]:
    """Walk the tree with the relaxed rule (module docstring); returns (path, bonus) as
    :func:`tokctl.decode.speculative.verify`. A node whose children were drawn from a draft
    distribution q (``draft.q``: a draft model's chain) is verified by speculative sampling
    against p~ instead of p, LANTERN's rule: accept x with probability min(1, p~(x) / q(x)),
    where p~(x) is the target mass of x's neighbourhood, else resample from the normalised
    max(0, p~ - q). p~ depends on the drafted x, so that output law is not bounded by delta
    (module docstring)."""
    children = draft.children()
    p_all = probs(logits, sampling).cpu()
    path: list[int] = []
    node = -1
    while True:
        kids = children.get(node, [])
        p = p_all[node + 1]
        tokens = [draft.tokens[c] for c in kids]
        owner = neighbourhoods(tokens, p, near, delta) if kids else {}
        if kids and node in draft.q:
            y, nxt = verify_sampled(draft, node, kids, moved(p, tokens, owner), generator)
            if nxt is None:
                return path, y
        else:
            y = int(sample(p, generator))
            if y not in owner:
                return path, y
            nxt = kids[owner[y]]
        node = nxt
        path.append(node)


class Lantern(SpeculativeMethod):
    name = "lantern"

    def __init__(self, base: str = "recycling", k: int = 4, delta: float = 0.1,
                 base_args: dict[str, Any] | None = None, draft_probs: bool = False):
        super().__init__()
        delta = float(delta)
        if not 0.0 <= delta <= 1.0:
            raise UserError(f"method.delta={delta}: the total-variation budget must be in [0, 1]")
        if int(k) < 1:
            raise UserError(f"method.k={k} must be at least 1")
        self.k, self.delta, self.draft_probs = int(k), delta, bool(draft_probs)
        self.base = _base_method(str(base), base_args or {})
        self.near: torch.Tensor | None = None

    def setup(self, target, loaded) -> None:
        super().setup(target, loaded)
        vectors = getattr(loaded, "code_vectors", None)
        if vectors is None:
            raise UserError("method=lantern needs an image-token model whose tokenizer gives the "
                            "codes' latent vectors: run it through `tokctl tokenize-image sample`")
        if self.k >= len(vectors):
            raise UserError(f"method.k={self.k}: the codebook has {len(vectors)} codes, so at "
                            f"most {len(vectors) - 1} neighbours")
        self.base.setup(target, loaded)
        self.near = nearest_codes(vectors, self.k)
        self._near_rows = self.near.tolist()  # what relaxed_verify reads, a row a node

    # The base drafts and learns; LANTERN only changes how drafts are accepted.
    @property
    def wants_prompt_logits(self) -> bool:
        return self.base.wants_prompt_logits

    def start(self, prompt_ids, prefill_logits) -> None:
        self.base.start(prompt_ids, prefill_logits)

    @property
    def needs_draft(self) -> bool:  # method.base=draft drafts with a smaller prior
        return self.base.needs_draft

    def propose(self, tokens, settings, generator) -> Draft:
        draft = self.base.propose(tokens, settings, generator)
        # A sampled draft's probabilities are set aside (every draft is checked against the
        # target's own samples, lossless for any draft and what delta relaxes), unless
        # draft_probs asks for the paper's rule on independent draws from a draft model's q.
        if not (self.draft_probs and draft.scheme == IID):
            draft.scheme, draft.q, draft.draws = DETERMINISTIC, {}, {}
        return draft

    def verify(self, draft, logits, sampling, generator):
        if sampling.greedy:
            return verify(draft, logits, sampling, generator)
        return relaxed_verify(draft, logits, sampling, generator, self._near_rows, self.delta)

    def observe(self, tokens, draft, logits, path, bonus) -> None:
        self.base.observe(tokens, draft, logits, path, bonus)

    def snapshot(self):
        return self.base.snapshot()

    def restore(self, snap) -> None:
        self.base.restore(snap)

    def finish(self) -> None:
        self.base.finish()

    def run_info(self) -> dict:
        return {"base": self.base.name, "k": self.k, "delta": self.delta,
                "draft_probs": self.draft_probs,
                "base_info": self.base.run_info()}


def _base_method(name: str, overrides: dict[str, Any]) -> SpeculativeMethod:
    """The drafting method from its config (conf/decode/method/NAME.yaml) and overrides."""
    from omegaconf import OmegaConf

    from tokctl.config import conf_dir
    from tokctl.decode.job import build_method

    folder = conf_dir("decode") / "method"  # a checkout's conf/ or the wheel's copy
    path = folder / f"{name}.yaml"
    if name == "lantern" or not path.is_file():
        raise UserError(f"method.base={name}: not a drafting method (one of "
                        f"{', '.join(sorted(p.stem for p in folder.glob('*.yaml')))})")
    method = build_method(OmegaConf.merge(OmegaConf.load(path), overrides))
    if not isinstance(method, SpeculativeMethod):
        raise UserError(f"method.base={name}: not a draft-and-verify method")
    return method
