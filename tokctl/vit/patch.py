"""Patching a ViT's blocks so a token-compression method runs inside them.

Each block's ``forward`` is replaced by an instance attribute (the class and the weights are left
alone), so :meth:`Patch.remove` undoes it exactly and :meth:`Patch.disabled` runs the original
model for a moment. The patched forward is the pre-norm block every supported family shares::

    x = x + ls1(out_proj(attention(norm1(x))))     attention: PyTorch SDPA, with log(size) as an
    x = method.after_attention(x)                  additive mask (proportional attention)
    x = x + ls2(mlp(norm2(x)))

with the method's hooks before the block, after the attention and after the block. What a method
needs across blocks (token sizes, which patches each token stands for, tokens per layer) lives in
a :class:`TokenState` made fresh by the first block of every forward pass.

A method may instead give the whole block as one function of tensors (``fused_block``: ToMe).
Then ``compile=True`` runs each layer's block through ``torch.compile`` (whole graph, static
shapes: a layer's token count is fixed), and the baseline (:meth:`Patch.disabled`) runs the
model's own blocks compiled the same way, so the two compare like with like.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tokctl.errors import UserError
from tokctl.kernels.token_merge import merge_apply
from tokctl.vit.model import BlockParts, VitInfo


@dataclass
class TokenState:
    """What one forward pass knows about its tokens. Prefix tokens ([CLS], ...) come first."""

    prefix: int
    grid: tuple[int, int]
    size: torch.Tensor | None = None  # (B, N, 1) patches per token; None while every token is one
    source: torch.Tensor | None = None  # (B, N, N0) which input tokens each token stands for
    tokens_attn: list[int] = field(default_factory=list)  # tokens entering each block's attention
    tokens_mlp: list[int] = field(default_factory=list)  # tokens entering each block's MLP
    scratch: dict[str, Any] = field(default_factory=dict)  # per-forward data of the method

    @classmethod
    def start(cls, x: torch.Tensor, prefix: int, grid: tuple[int, int], trace: bool) -> "TokenState":
        st = cls(prefix=prefix, grid=grid)
        if trace:
            b, n, _ = x.shape
            st.source = torch.eye(n, device=x.device, dtype=torch.float32).expand(b, n, n)
        return st

    def sizes(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is None:
            return torch.ones(x.shape[0], x.shape[1], 1, device=x.device, dtype=torch.float32)
        return self.size

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Proportional attention: a token standing for s patches gets log(s) added to its logits,
        as if its key appeared s times."""
        if self.size is None:
            return None
        return self.size.log().to(dtype)[:, None, None, :, 0]

    def gather(self, index: torch.Tensor) -> None:
        """Keep only the tokens at ``index`` (B, N') in size and source (pruning, reordering)."""
        if self.size is not None:
            self.size = self.size.gather(1, index[..., None])
        if self.source is not None:
            self.source = self.source.gather(1, index[..., None].expand(-1, -1, self.source.shape[-1]))


@dataclass
class AttentionView:
    """The attention of one block, for methods that score tokens by it (EViT, DiffRate)."""

    q: torch.Tensor  # (B, H, N, d)
    k: torch.Tensor
    scale: float
    bias: torch.Tensor | None

    def cls_attention(self) -> torch.Tensor:
        """Attention from the first token ([CLS]) to every token, averaged over heads: (B, N)."""
        logits = (self.q[:, :, :1] @ self.k.transpose(-1, -2)).float() * self.scale
        if self.bias is not None:
            logits = logits + self.bias.float()
        return logits.softmax(-1)[:, :, 0].mean(1)

    def key_metric(self) -> torch.Tensor:
        """ToMe's similarity metric: the keys averaged over heads, (B, N, d)."""
        return self.k.mean(1)


class TokenMethod(nn.Module):
    """A token-compression method: hooks the patched blocks call. Parameters (TSM's modules,
    DiffRate's rate logits) are ordinary submodules; most methods have none."""

    name = "none"
    prop_attn = True  # proportional attention when tokens stand for several patches

    def setup(self, info: VitInfo) -> None:
        """Check the method's settings against this model (raise UserError) before any forward."""

    def before_block(self, index: int, x: torch.Tensor, st: TokenState) -> torch.Tensor:
        return x

    def attend(self, index: int, q, k, v, st: TokenState, parts: BlockParts) -> torch.Tensor:
        bias = st.attention_bias(q.dtype) if self.prop_attn else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=parts.scale)

    def after_attention(self, index: int, x: torch.Tensor, attn: AttentionView,
                        st: TokenState) -> torch.Tensor:
        return x

    def after_block(self, index: int, x: torch.Tensor, st: TokenState) -> torch.Tensor:
        return x

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model to patch: the input model itself, or (for methods that fine-tune the
        backbone, like TSM) a copy with their weights, leaving the input as the baseline."""
        return model

    def planned_tokens(self, info: VitInfo) -> list[tuple[int, int]] | None:
        """(attention, MLP) token counts per layer if known without running, else None."""
        return None

    def overhead_macs(self, info: VitInfo) -> float:
        """Multiply-adds the method itself adds per image (clustering, slimming modules)."""
        return 0.0

    def describe(self) -> dict[str, Any]:
        return {"method": self.name}

    # Optional: the whole block as ``fused_block(index, parts, x, size) -> (x, size, merge)``, a
    # function of tensors (merge: a MergeResult for the source map, or None). Methods without it
    # run through the hooks above.
    fused_block = None


def _compile(fn, backend: str = "inductor"):
    """torch.compile for one layer's block: whole graph (a graph break is an error), static shapes."""
    # Every layer is its own specialisation of the same code (other weights, other token count):
    # allow as many as the model has layers, times a few batch sizes and dtypes.
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 256))
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)


class Patch:
    """The patch on one model: apply, remove, or briefly disable."""

    def __init__(self, model: nn.Module, info: VitInfo, method: TokenMethod, trace_source: bool = False,
                 compile: bool | str = False):
        # compile: False, True (inductor) or the name of a torch.compile backend (tests: "aot_eager").
        self.model, self.info, self.method = model, info, method
        self.trace_source = trace_source
        self.compile = bool(compile)
        self._backend = compile if isinstance(compile, str) else "inductor"
        self._fused: list | None = None
        self._originals: list | None = None
        self.state: TokenState | None = None
        self.last_state: TokenState | None = None
        self._applied = False

    def apply(self) -> "Patch":
        if getattr(self.model, "_tokctl_patch", None) is not None:
            raise UserError("this model is already patched; remove the first patch before applying another")
        self.method.setup(self.info)
        if self.method.fused_block is not None:
            fused = [functools.partial(self.method.fused_block, index, parts)
                     for index, parts in enumerate(self.info.parts)]
            if self.compile:
                # Inside a compiled graph the merge is torch's (inductor fuses it with its
                # neighbours); the Triton kernels serve eager runs on a GPU.
                if hasattr(self.method, "kernel"):
                    self.method.kernel = False
                fused = [_compile(f, self._backend) for f in fused]
            self._fused = fused
        elif self.compile:
            raise UserError(f"compile=true: method {self.method.name} has no fused block to compile "
                            f"(supported: tome)")
        if self.compile:
            # The baseline: the model's own block forwards, compiled alike (graph breaks allowed:
            # they are the library's code).
            self._originals = [torch.compile(type(b).forward.__get__(b), dynamic=False, backend=self._backend)
                               for b in self.info.blocks]
        for index, block in enumerate(self.info.blocks):
            block.forward = functools.partial(self._block_forward, index)
        self.model._tokctl_patch = self
        self._applied = True
        return self

    def remove(self) -> None:
        for block in self.info.blocks:
            if "forward" in block.__dict__:
                del block.forward
        if getattr(self.model, "_tokctl_patch", None) is self:
            del self.model._tokctl_patch
        self._applied = False

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the unpatched model inside the block: the same weights, the original forward."""
        saved = [block.__dict__.pop("forward", None) for block in self.info.blocks]
        if self._originals is not None:
            for block, fwd in zip(self.info.blocks, self._originals):
                block.forward = fwd
        try:
            yield
        finally:
            for block, fwd in zip(self.info.blocks, saved):
                block.__dict__.pop("forward", None)
                if self._applied and fwd is not None:
                    block.forward = fwd

    def _block_forward(self, index: int, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # *args/**kwargs: the attention mask and options the encoder passes; a vision encoder has
        # no padding, so there is nothing to mask.
        x = hidden_states
        if index == 0:
            self.state = TokenState.start(x, self.info.prefix_tokens, self.info.grid, self.trace_source)
        st, method, parts = self.state, self.method, self.info.parts[index]
        if self._fused is not None:
            st.tokens_attn.append(x.shape[1])
            x, st.size, merge = self._fused[index](x, st.size)
            if merge is not None and st.source is not None:
                st.source = merge_apply(st.source, merge.unm_idx, merge.src_idx, merge.dst_idx,
                                        st.prefix, reduce="amax")
            st.tokens_mlp.append(x.shape[1])
            if index == len(self.info.blocks) - 1:
                self.last_state = st
            return x
        x = method.before_block(index, x, st)
        q, k, v = parts.project(parts.norm1(x))
        st.tokens_attn.append(x.shape[1])
        out = method.attend(index, q, k, v, st, parts)
        out = parts.out_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        x = x + (parts.ls1(out) if parts.ls1 is not None else out)
        bias = st.attention_bias(q.dtype) if method.prop_attn else None
        x = method.after_attention(index, x, AttentionView(q, k, parts.scale, bias), st)
        st.tokens_mlp.append(x.shape[1])
        h = parts.mlp(parts.norm2(x))
        x = x + (parts.ls2(h) if parts.ls2 is not None else h)
        x = method.after_block(index, x, st)
        if index == len(self.info.blocks) - 1:
            self.last_state = st
        return x


def apply_patch(model: nn.Module, method: TokenMethod, info: VitInfo | None = None,
                trace_source: bool = False, compile: bool | str = False) -> Patch:
    from tokctl.vit.model import describe

    return Patch(model, info or describe(model), method, trace_source, compile).apply()


def remove_patch(model: nn.Module) -> None:
    patch = getattr(model, "_tokctl_patch", None)
    if patch is not None:
        patch.remove()
