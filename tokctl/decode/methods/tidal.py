"""`method=tidal`: TidalDecode's position-persistent sparse attention (Yang et al., 2024).

Consecutive layers attend to much the same positions, so instead of choosing positions in every
layer, a few *token selection layers* run full attention and keep the ``top_k`` positions each kv
head weighted most (softmax weights summed over its query heads); every later layer attends only
to those, until a *re-selection layer* part-way up chooses again from its own full attention.
Layers before the first selection layer run full attention (the lowest layers attend broadly).

The paper's setting for Llama-3-8B (32 layers): layers 0-1 full, selection at layer 2,
re-selection at layer 13, 256 positions. ``reselection_layer: auto`` keeps 13/32 of the depth.
"""

from __future__ import annotations

from tokctl.decode.sparse import Policy, SparseDecoding, full_with_scores, top_positions
from tokctl.errors import UserError


class TidalPolicy(Policy):
    def __init__(self, num_layers, dense, selection_layer: int, reselection_layer: int, top_k: int):
        self.selection = (selection_layer, reselection_layer)
        self.top_k = top_k
        self.index = None
        super().__init__(num_layers, dense)

    def attend(self, layer, q, k, v):
        if layer < self.selection[0]:
            return self.full(q, k, v), k.shape[1]
        if layer in self.selection:
            out, scores = full_with_scores(q, k, v)
            self.index = top_positions(scores, self.top_k)
            return out, k.shape[1]
        return self.gathered(q, k, v, self.index)


class TidalDecode(SparseDecoding):
    name = "tidal"

    def __init__(self, top_k: int = 256, selection_layer: int = 2,
                 reselection_layer: int | str = "auto"):
        if int(selection_layer) < 0:
            raise UserError(f"method.selection_layer={selection_layer} must be >= 0")
        self._set_top_k(top_k)
        self.selection_layer = int(selection_layer)
        self.reselection_value = reselection_layer

    def make_policy(self, fast):
        n = len(fast.layers)
        if not self.selection_layer < n - 1:
            raise UserError(f"method.selection_layer={self.selection_layer}: this model has {n} "
                            f"layers (0-{n - 1}); the selection layer must leave layers above it")
        if self.reselection_value == "auto":
            self.reselection_layer = max(self.selection_layer + 1, round(13 * n / 32))
        else:
            self.reselection_layer = int(self.reselection_value)
        if not self.selection_layer < self.reselection_layer < n:
            raise UserError(f"method.reselection_layer={self.reselection_value}: choose a layer "
                            f"above selection_layer={self.selection_layer} and below {n}")
        return TidalPolicy(n, fast.attention, self.selection_layer, self.reselection_layer,
                           self.top_k)

    def run_info(self):
        return {"top_k": self.top_k, "selection_layer": self.selection_layer,
                "reselection_layer": getattr(self, "reselection_layer", self.reselection_value)}
