"""Weight formats for the decoder's linear layers, chosen once at load time and shared by every
method and baseline of a run.

Weight-only int8 (``model.quant=int8``, gpt-fast's int8 mode): each output row of a weight is
stored as int8 with one scale (symmetric, absmax / 127); activations stay in the model's dtype.

On the CPU the product runs through torch's ``_weight_int8pack_mm`` (int8 weights widened inside
the kernel, so a step reads a quarter of fp32's weight bytes); elsewhere, or where that op is
missing, the weight is widened and multiplied (what gpt-fast does under torch.compile, which
fuses the widening into the matmul).

Prepacked bf16 (``model.prepack``): on a CPU, a plain bf16 ``F.linear`` reorders its weight into
oneDNN's blocked layout on every call, and for a single row it falls back to a slower kernel than
for two. Reordering once, at load (:class:`PackedLinear`), makes a one-token step read only the
weights, and the packed kernel, packed for one row, reduces every row in the same order whatever
the number of rows: a token's logits are the same in a one-token ``ar`` step and in a 64-token
tree, which is what makes bf16 speculative decoding exact (measured on this CPU: plain bf16's
576 -> 49152 head is not batch-invariant; packed, every SmolLM2 linear is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUANTS = ("none", "int8")
PREPACK = ("auto", "true", "false")


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


class PackedLinear(nn.Module):
    """A bf16 linear layer whose weight is held in oneDNN's layout, reordered once."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        # Batch hint 1: the one-row layout is the batch-invariant one (a hint of 32 is not for the
        # head) and costs multi-row blocks little.
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]).contiguous(),
                                                 self.weight, self.bias, "none", [], "")
        return out.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 prepacked"


def fuse_linears(layers: list[nn.Module]) -> nn.Module:
    """One layer whose output is ``layers``' outputs side by side (q, k and v; gate and up): one
    matmul call where there were several, each weight read once. Plain layers become views of the
    fused weight (no second copy; the model's own forward reads the same bytes); int8 layers
    concatenate their rows and per-row scales; prepacked ones are unpacked, joined and repacked."""
    kinds = {type(m) for m in layers}
    biased = {m.bias is not None for m in layers}
    if len(kinds) != 1 or len(biased) != 1:
        raise ValueError("fuse_linears takes layers of one kind, all with or all without bias")
    kind = kinds.pop()
    bias = torch.cat([m.bias.detach() for m in layers]) if biased.pop() else None
    if kind is Int8Linear:
        fused = Int8Linear.__new__(Int8Linear)
        nn.Module.__init__(fused)
        fused.register_buffer("weight", torch.cat([m.weight for m in layers]))
        fused.register_buffer("scales", torch.cat([m.scales for m in layers]))
        fused.packed = layers[0].packed
    elif kind is PackedLinear:
        fused = PackedLinear(torch.cat([m.weight.to_dense() for m in layers]))
    elif kind is nn.Linear:
        weight = torch.cat([m.weight.detach() for m in layers])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=False)
        row = 0
        for m in layers:
            rows = m.weight.shape[0]
            m.weight = nn.Parameter(weight[row:row + rows], requires_grad=False)
            row += rows
    else:
        raise ValueError(f"cannot fuse {kind.__name__} layers")
    fused.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    fused.in_features = layers[0].in_features
    fused.out_features = sum(m.out_features for m in layers)
    return fused


def prepack_applies(model: nn.Module, prepack: str, quant: str = "none", compiled: bool = False) -> bool:
    """Whether ``model.prepack`` (auto | true | false) packs this model: auto packs bf16 weights
    on a CPU whose oneDNN has bf16 kernels, unless another weight format was chosen or the step
    is compiled (Inductor's freezing packs the weights itself and cannot lower packed ones)."""
    if prepack not in PREPACK:
        raise ValueError(f"model.prepack={prepack}: choose one of {', '.join(PREPACK)}")
    if compiled and prepack == "true":
        raise ValueError("model.prepack=true cannot be compiled: compile=true packs the weights "
                         "itself (Inductor freezing); drop model.prepack or set it to auto")
    weight = model.get_output_embeddings().weight
    usable = (weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
              and quant in (None, "none") and torch.backends.mkldnn.is_available()
              and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if prepack == "true" and not usable:
        raise ValueError("model.prepack=true packs bfloat16 weights on a CPU with oneDNN bf16 "
                         "kernels (model.dtype=bfloat16 model.device=cpu model.quant=none)")
    return usable and prepack != "false" and not compiled


def _replace_linears(model: nn.Module, make) -> None:
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(mod))


def prepack(model: nn.Module) -> nn.Module:
    """Pack the decoder's linear layers and the head, in place (tied heads are untied)."""
    _replace_linears(model, lambda m: PackedLinear(m.weight, m.bias))
    model.config.tokctl_prepacked = True
    return model


def quantize(model: nn.Module, quant: str) -> nn.Module:
    """Replace the decoder's linear layers and the output head by int8 ones, in place. The input
    embedding stays as it is (a lookup reads one row per token; tied heads are untied by this)."""
    if quant in (None, "none"):
        return model
    if quant != "int8":
        raise ValueError(f"model.quant={quant}: choose one of {', '.join(QUANTS)}")
    _replace_linears(model, Int8Linear)
    model.config.tokctl_quant = quant
    return model


def weight_bytes(model: nn.Module, exit_layer: int | None = None) -> int:
    """Bytes of weights one decode step reads: every parameter and int8 buffer except the input
    embedding (read one row a token), the head counted even when tied to the embedding."""
    emb = model.get_input_embeddings().weight
    total = 0
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        key = id(t) if t.is_mkldnn else t.data_ptr()  # oneDNN tensors have no data pointer
        if key in seen or t is emb or "rotary" in name:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear) and head.weight is emb:
        total += emb.numel() * emb.element_size()
    return total
