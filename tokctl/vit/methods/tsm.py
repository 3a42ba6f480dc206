"""Token Slimming Module of SiT (Zong et al., ECCV 2022, "Self-slimmed Vision Transformer").

After the last block of each stage, a TSM turns the N patch tokens into N' = ``keep_ratio`` * N
by soft aggregation: a small MLP scores every token for every output slot, a softmax over the N
input tokens (with a learned temperature) makes each output a convex combination of inputs, and
X' = A^T X. Unlike hard dropping, no token is discarded outright. The modules are learned
(``tokctl compress-vit train-tsm``): the student (the backbone with TSMs, fine-tuned as in the
paper) is distilled from the frozen uncompressed model with the paper's Feature Recalibration
Distillation: the logits (KL) and, layer by layer, the patch tokens, which a reverse TSM
(training only) maps back to the full N for an MSE against the teacher's tokens.

A checkpoint holds the TSM weights, the fine-tuned backbone and the layout; the method loads it
into a copy of the model, so the uncompressed model stays the baseline of the same run.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from tokctl.errors import UNREADABLE_FILE, UserError, one_line_error
from tokctl.vit.patch import TokenMethod

SHIPPED = Path(__file__).resolve().parent.parent / "weights"


class TokenSlimming(nn.Module):
    """N tokens -> ``out_tokens`` tokens, each a softmax-weighted mix of all inputs."""

    def __init__(self, dim: int, out_tokens: int, hidden_ratio: float = 0.5):
        super().__init__()
        hidden = max(1, int(dim * hidden_ratio))
        self.score = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out_tokens))
        self.scale = nn.Parameter(torch.ones(1))

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N', N): row j says how much of each input token goes into output token j."""
        return (self.score(x) * self.scale).softmax(dim=1).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights(x) @ x


class ReverseSlimming(nn.Module):
    """Training only: N' tokens back to N (an MLP across tokens, then one across channels), so a
    slimmed layer can be compared with the teacher's full layer."""

    def __init__(self, dim: int, in_tokens: int, out_tokens: int, ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(in_tokens, int(out_tokens * ratio)), nn.GELU(),
                                       nn.Linear(int(out_tokens * ratio), out_tokens))
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(nn.Linear(dim, int(dim * ratio)), nn.GELU(), nn.Linear(int(dim * ratio), dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


def stage_tokens(patches: int, stages: int, keep_ratio: float) -> list[int]:
    """Patch tokens per stage, as in the paper: N * keep_ratio^i."""
    return [max(1, int(patches * keep_ratio ** i)) for i in range(stages)]


class SlimTokens(TokenMethod):
    name = "tsm"
    prop_attn = False

    def __init__(self, checkpoint: str | None = None, slim_after: Sequence[int] = (1, 3, 5),
                 keep_ratio: float = 0.5, hidden_ratio: float = 0.5):
        super().__init__()
        self.checkpoint = checkpoint
        self.slim_after = [int(i) for i in slim_after]
        self.keep_ratio = float(keep_ratio)
        self.hidden_ratio = float(hidden_ratio)
        self.backbone_state: dict | None = None
        self.tsm = nn.ModuleList()
        self.tokens: list[int] = []
        if checkpoint:
            self._load(checkpoint)

    # ------------------------------------------------------------------------- weights
    def _load(self, checkpoint: str) -> None:
        path = Path(checkpoint).expanduser()
        if not path.is_file() and (SHIPPED / checkpoint).is_file():
            path = SHIPPED / checkpoint
        if path.is_dir():
            path = path / "tsm.pt"
        if not path.is_file():
            raise UserError(f"method.checkpoint={checkpoint}: no such file; train one with "
                            f"`tokctl compress-vit train-tsm` (it writes tsm.pt in its run folder)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            layout = state["layout"]
        except UNREADABLE_FILE as exc:
            raise UserError(f"{path} is not a tokctl TSM checkpoint: {one_line_error(exc)}") from None
        self.slim_after = [int(i) for i in layout["slim_after"]]
        self.keep_ratio = float(layout["keep_ratio"])
        self.hidden_ratio = float(layout.get("hidden_ratio", 0.5))
        self._pending = (state["tsm"], layout)
        self.backbone_state = state.get("backbone")

    def build(self, info) -> None:
        """Create the slimming modules for this model (random init, for training)."""
        if sorted(set(self.slim_after)) != self.slim_after or not self.slim_after:
            raise UserError(f"method.slim_after={self.slim_after} must be increasing layer indices")
        if self.slim_after[-1] >= info.depth - 1 or self.slim_after[0] < 0:
            raise UserError(f"method.slim_after={self.slim_after} must lie within layers 0..{info.depth - 2}")
        if not 0.0 < self.keep_ratio < 1.0:
            raise UserError(f"method.keep_ratio={self.keep_ratio} must be within (0, 1)")
        self.tokens = stage_tokens(info.num_patches, len(self.slim_after) + 1, self.keep_ratio)
        self.tsm = nn.ModuleList(TokenSlimming(info.hidden_size, n, self.hidden_ratio) for n in self.tokens[1:])

    def setup(self, info) -> None:
        if not len(self.tsm):
            pending = getattr(self, "_pending", None)
            if pending is None:
                raise UserError("method=tsm needs trained modules: method.checkpoint=PATH (see "
                                "`tokctl compress-vit train-tsm`)")
            tsm_state, layout = pending
            if int(layout["num_patches"]) != info.num_patches or int(layout["hidden_size"]) != info.hidden_size:
                raise UserError(f"method.checkpoint was trained for {layout['num_patches']} patches of width "
                                f"{layout['hidden_size']}; this model has {info.num_patches} of width {info.hidden_size}")
            self.build(info)
            self.tsm.load_state_dict({k: v.float() for k, v in tsm_state.items()})
            self._pending = None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The fine-tuned student when the checkpoint carries one (a copy; the input model stays
        the uncompressed baseline), else the model itself."""
        if self.backbone_state is None:
            return model
        student = copy.deepcopy(model)
        missing, unexpected = student.load_state_dict(
            {k: v.to(next(model.parameters()).dtype) for k, v in self.backbone_state.items()}, strict=False)
        if unexpected or len(missing) == len(list(student.state_dict())):
            raise UserError("method.checkpoint's backbone does not fit this model")
        return student.eval()

    def planned_tokens(self, info):
        tokens = stage_tokens(info.num_patches, len(self.slim_after) + 1, self.keep_ratio)
        out, stage = [], 0
        for layer in range(info.depth):
            out.append((tokens[stage] + info.prefix_tokens,) * 2)
            if layer in self.slim_after:
                stage += 1
        return out

    def overhead_macs(self, info) -> float:
        total, n = 0.0, info.num_patches
        hidden = int(info.hidden_size * self.hidden_ratio)
        for out in stage_tokens(info.num_patches, len(self.slim_after) + 1, self.keep_ratio)[1:]:
            total += n * (info.hidden_size * hidden + hidden * out) + out * n * info.hidden_size
            n = out
        return total

    def after_block(self, index, x, st):
        if index not in self.slim_after:
            return x
        p = st.prefix
        module = self.tsm[self.slim_after.index(index)]
        weights = module.weights(x[:, p:])
        if st.source is not None:
            # Show each patch under the output token that took most of it.
            owner = weights.argmax(1)  # (B, N)
            onehot = torch.nn.functional.one_hot(owner, weights.shape[1]).transpose(1, 2).float()
            st.source = torch.cat([st.source[:, :p], (onehot @ st.source[:, p:]).clamp_max(1)], dim=1)
        return torch.cat([x[:, :p], weights @ x[:, p:]], dim=1)

    def describe(self):
        return {"method": self.name, "slim_after": self.slim_after, "keep_ratio": self.keep_ratio,
                "checkpoint": self.checkpoint, "patch_tokens": self.tokens}
