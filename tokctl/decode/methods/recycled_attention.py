"""`method=recycled_attention`: Recycled Attention (Xu et al., 2024).

Every ``stride`` steps (the paper's S) a step runs full attention in every layer and each layer
remembers, per kv head, the ``top_k`` positions (the paper's K) its query heads weighted most. The
steps between recycle that pattern: each layer attends only to its remembered positions plus the
tokens generated since the full step (which the full step could not have seen). A first decode
step after the prompt is a full step.
"""

from __future__ import annotations

import torch

from tokctl.decode.sparse import Policy, SparseDecoding, full_with_scores, top_positions
from tokctl.errors import UserError


class RecycledPolicy(Policy):
    def __init__(self, num_layers, dense, stride: int, top_k: int):
        self.stride = stride
        self.top_k = top_k
        super().__init__(num_layers, dense)

    def reset(self):
        super().reset()
        self.index: list[torch.Tensor | None] = [None] * self.num_layers
        self.full_at = 0  # the window length at the last full step

    def attend(self, layer, q, k, v):
        total = k.shape[1]
        if (self.steps - 1) % self.stride == 0:
            out, scores = full_with_scores(q, k, v)
            # Room for the recycled positions and the stride's new tokens: one shape per layer.
            idx = torch.full((k.shape[0], self.top_k + self.stride), -1, dtype=torch.long,
                             device=k.device)
            top = top_positions(scores, self.top_k)
            idx[:, :top.shape[1]] = top
            self.index[layer] = idx
            self.full_at = total
            return out, total
        idx = self.index[layer]
        new = total - self.full_at  # generated since the full step, this one included
        idx[:, self.top_k + new - 1] = total - 1
        return self.gathered(q, k, v, idx)


class RecycledAttention(SparseDecoding):
    name = "recycled_attention"

    def __init__(self, stride: int = 10, top_k: int = 256):
        if int(stride) < 1:
            raise UserError(f"method.stride={stride} must be at least 1")
        self.stride = int(stride)
        self._set_top_k(top_k)

    def make_policy(self, fast):
        return RecycledPolicy(len(fast.layers), fast.attention, self.stride, self.top_k)

    def run_info(self):
        return {"stride": self.stride, "top_k": self.top_k}
