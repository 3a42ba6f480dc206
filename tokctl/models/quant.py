"""Weight-only int8 linear layers (gpt-fast's int8 mode): each output row of a weight is stored as
int8 with one scale (symmetric, absmax / 127); activations stay in the model's dtype.

On the CPU the product runs through torch's ``_weight_int8pack_mm`` (int8 weights widened inside
the kernel, so a step reads a quarter of fp32's weight bytes); elsewhere, or where that op is
missing, the weight is widened and multiplied (what gpt-fast does under torch.compile, which
fuses the widening into the matmul).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUANTS = ("none", "int8")


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-8) / 127.0
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127)
                             .to(torch.int8).contiguous())
        self.register_buffer("scales", scale.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = self.weight.device.type == "cpu" and hasattr(torch.ops.aten,
                                                                   "_weight_int8pack_mm")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            shape = x.shape
            out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight,
                                                     self.scales.to(x.dtype))
            out = out.view(*shape[:-1], self.out_features)
        else:
            out = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize(model: nn.Module, quant: str) -> nn.Module:
    """Replace the decoder's linear layers and the output head by int8 ones, in place. The input
    embedding stays as it is (a lookup reads one row per token; tied heads are untied by this)."""
    if quant in (None, "none"):
        return model
    if quant != "int8":
        raise ValueError(f"model.quant={quant}: choose one of {', '.join(QUANTS)}")
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(mod))
    model.config.tokctl_quant = quant
    return model


def weight_bytes(model: nn.Module, exit_layer: int | None = None) -> int:
    """Bytes of weights one decode step reads: every parameter and int8 buffer except the input
    embedding (read one row a token), the head counted even when tied to the embedding."""
    emb = model.get_input_embeddings().weight
    total = 0
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.data_ptr() in seen or t is emb or "rotary" in name:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear) and head.weight is emb:
        total += emb.numel() * emb.element_size()
    return total
