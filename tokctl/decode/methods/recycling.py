"""`method=recycling`: Token Recycling (Luo et al., 2024).

Every forward pass yields a distribution at every position; its top-k candidates are "trash" once
one token is chosen. Token Recycling keeps them: an adjacency matrix (vocab x k) holds, for each
token id, the top-k next tokens last seen after it. A draft tree is read from the matrix breadth
first along a template of candidate ranks (path (0, 2) = the best candidate after the root, then
the third-best after that), verified in one pass, and afterwards every node's row (rejected nodes
too) is replaced by that node's own top-k. The matrix persists across the prompts of a run and can
be saved and loaded (``matrix_path``).

Where tokctl differs from the paper's fixed 80-node template: the template is grown best-first
from online estimates of how often the rank-r candidate is the target's choice, and cut each step
to the size the measured verify cost of this hardware pays for (``budget=auto``). A fixed template
(``template=[[0], [1], [0, 0], ...]``) and a fixed size (``budget=N``) are available too.
"""

from __future__ import annotations

import heapq
from pathlib import Path
from typing import Any

import torch

from tokctl.decode.budget import SizedDrafts
from tokctl.decode.speculative import Draft, SpeculativeMethod
from tokctl.decode.trees import CandidateTree
from tokctl.errors import UserError


class RankStats:
    """How often the rank-r candidate of a node's matrix row is the target's next token, over the
    verified nodes whose row was filled (a node with an empty row drafts nothing, so those say
    nothing about the nodes that do get drafted), shrunk towards a geometric prior while data
    are few."""

    def __init__(self, k: int, prior_top: float = 0.3, prior_decay: float = 0.5,
                 prior_weight: float = 20.0):
        self.k = k
        self.prior = torch.tensor([prior_top * prior_decay**r for r in range(k)], dtype=torch.float64)
        self.weight = prior_weight
        self.hits = torch.zeros(k, dtype=torch.float64)
        self.trials = 0.0

    def update(self, rows: torch.Tensor, chosen: torch.Tensor) -> None:
        filled = rows[:, 0] >= 0
        rows, chosen = rows[filled], chosen[filled]
        self.hits += (rows == chosen[:, None]).sum(0).double().cpu()
        self.trials += rows.shape[0]

    def rates(self) -> list[float]:
        return ((self.hits + self.weight * self.prior) / (self.trials + self.weight)).tolist()


def grow_template(rates: list[float], max_nodes: int, max_depth: int) -> list[tuple[tuple[int, ...], float]]:
    """The ``max_nodes`` rank paths of highest estimated acceptance, best first:
    score(path) = product of rates[rank] along it."""
    heap = [(-rates[r], (r,)) for r in range(len(rates))]
    heapq.heapify(heap)
    out = []
    while heap and len(out) < max_nodes:
        neg, path = heapq.heappop(heap)
        out.append((path, -neg))
        if len(path) < max_depth:
            for r, rate in enumerate(rates):
                heapq.heappush(heap, (neg * rate, path + (r,)))
    return out


class TokenRecycling(SpeculativeMethod, SizedDrafts):
    name = "recycling"

    def __init__(self, k: int = 8, budget: Any = "auto", max_nodes: int = 80, max_depth: int = 8,
                 template: list | None = None, matrix_path: str | None = None,
                 update_from_prompt: bool = False, refresh_every: int = 16):
        super().__init__()
        if k < 1:
            raise UserError(f"k={k} must be at least 1")
        self.k = int(k)
        self.max_depth = int(max_depth)
        self.template = [tuple(int(r) for r in p) for p in template] if template else None
        if self.template:
            bad = [p for p in self.template if not p or max(p) >= self.k or min(p) < 0]
            if bad:
                raise UserError(f"template path {list(bad[0])} needs ranks in 0..{self.k - 1}")
            known = set()
            for p in self.template:
                if len(p) > 1 and p[:-1] not in known:
                    raise UserError(f"template path {list(p)} comes before its parent {list(p[:-1])}")
                known.add(p)
            max_nodes = min(int(max_nodes), len(self.template))
        self.init_budget(budget, max_nodes)
        self.matrix_path = Path(matrix_path).expanduser() if matrix_path else None
        self.update_from_prompt = bool(update_from_prompt)
        self.refresh_every = int(refresh_every)
        self.matrix: torch.Tensor | None = None
        self.stats_r = RankStats(self.k)
        self._paths: list[tuple[tuple[int, ...], float]] = []
        self._steps = 0

    # --- state -----------------------------------------------------------------------------------
    def setup(self, target, loaded) -> None:
        super().setup(target, loaded)
        self.setup_budget(target, loaded)
        self.matrix = torch.full((target.vocab_size, self.k), -1, dtype=torch.long)
        if self.matrix_path and self.matrix_path.is_file():
            saved = torch.load(self.matrix_path, map_location="cpu", weights_only=True)
            if not isinstance(saved, dict) or saved.get("matrix") is None \
                    or tuple(saved["matrix"].shape) != tuple(self.matrix.shape):
                raise UserError(f"method.matrix_path={self.matrix_path} holds no adjacency matrix "
                                f"of shape {tuple(self.matrix.shape)} (another model or k?)")
            self.matrix = saved["matrix"].long()
            if "hits" in saved:
                self.stats_r.hits = saved["hits"].double()
                self.stats_r.trials = float(saved["trials"])
        self._refresh_template()

    def snapshot(self):
        return (self.matrix.clone(), self.stats_r.hits.clone(), self.stats_r.trials)

    def restore(self, snap) -> None:
        self.matrix, self.stats_r.hits, self.stats_r.trials = snap[0], snap[1], snap[2]
        self.chosen_sizes, self.predicted_gain = [], []
        self._refresh_template()

    def finish(self) -> None:
        if self.matrix_path:
            from tokctl.runs import atomic_torch_save

            atomic_torch_save({"matrix": self.matrix, "hits": self.stats_r.hits,
                               "trials": self.stats_r.trials, "k": self.k}, self.matrix_path)

    def _refresh_template(self) -> None:
        rates = self.stats_r.rates()
        if self.template:
            self._paths = []
            for p in self.template:
                score = 1.0
                for r in p:
                    score *= rates[r]
                self._paths.append((p, score))
        else:
            self._paths = grow_template(rates, self.max_nodes, self.max_depth)

    # --- drafting --------------------------------------------------------------------------------
    @property
    def wants_prompt_logits(self) -> bool:
        # Every prompt position's top-k seeds the matrix. Off by default: on a CPU the
        # full-vocabulary head over a long prompt costs more than it returns.
        return self.update_from_prompt

    def start(self, prompt_ids, prefill_logits) -> None:
        if self.update_from_prompt and prefill_logits.dim() == 2:
            self.matrix[torch.as_tensor(prompt_ids)] = prefill_logits.topk(self.k, dim=-1).indices.cpu()

    def add_recycled(self, tree: CandidateTree, root_token: int) -> None:
        """Walk the template breadth first, reading each node's token from its parent's row."""
        node_of: dict[tuple[int, ...], int] = {}
        token_of: dict[tuple[int, ...], int] = {(): root_token}
        rows: dict[int, list[int]] = {}  # matrix rows read once each as Python ints: a template
        for path, score in self._paths:  # of ~50 nodes reads ~10 rows (a tensor read each ~15 us)
            parent_token = token_of.get(path[:-1])
            if parent_token is None:
                continue
            row = rows.get(parent_token)
            if row is None:
                row = rows[parent_token] = self.matrix[parent_token].tolist()
            token = row[path[-1]]
            if token < 0:
                continue
            parent = node_of[path[:-1]] if len(path) > 1 else -1
            node_of[path] = tree.add(token, parent, score)
            token_of[path] = token

    def propose(self, tokens, settings, generator) -> Draft:
        tree = CandidateTree()
        self.add_recycled(tree, tokens[-1])
        return tree.select(self.choose_size(tree.ranked_scores()))

    def observe(self, tokens, draft, logits, path, bonus) -> None:
        node_tokens = torch.tensor([tokens[-1]] + draft.tokens)
        chosen = logits.argmax(-1).cpu()
        self.stats_r.update(self.matrix[node_tokens], chosen)
        self.matrix[node_tokens] = logits.topk(self.k, dim=-1).indices.cpu()
        self._steps += 1
        if self._steps % self.refresh_every == 0:
            self._refresh_template()

    def run_info(self) -> dict:
        return {"k": self.k, "rank_acceptance": [round(r, 4) for r in self.stats_r.rates()],
                "matrix_rows_filled": int((self.matrix[:, 0] >= 0).sum()) if self.matrix is not None
                else 0, **self.budget_info()}
