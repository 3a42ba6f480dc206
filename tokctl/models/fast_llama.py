"""A lean forward pass for Llama-architecture models over a fixed-capacity KV cache (gpt-fast's idea).

It uses the Hugging Face model's own parameters (no copy) and the same arithmetic in the same
order as transformers' LlamaModel, so its logits match HF's to float rounding. What it removes is
per-call overhead: no cache objects, no output dataclasses, no host synchronisation.

One step (:meth:`FastLlama.step`) takes a block of new tokens as a tree (``parents``, -1 for a child
of the committed prefix) and the committed length as a 0-d device tensor. Everything else is built
on the device inside the step, with shapes that depend only on the block size and the attention
window: the ancestor matrix (by repeated boolean squaring of parent-or-self), the positions (prefix
length plus depth), the cache slots (written with ``index_copy_``) and the attention mask. So the
step is one graph that ``torch.compile(fullgraph=True)`` takes whole: with dynamic shapes, one
graph for every block size and window (on a CPU); padded to a few sizes (:data:`BUCKETS`), a few
static graphs (for CUDA graphs). Committing an accepted path is a device gather of its slots in
each layer (:meth:`StaticKVCache.keep`).
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from tokctl.kernels.tree_attention import tree_attention
from tokctl.models.quant import fuse_linears

SUPPORTED = ("llama",)

# Block sizes a step is padded to when shapes must stay fixed (compiled or exact runs). Larger
# blocks (a long prompt) are cut into chunks of the largest.
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def bucket(n: int, buckets=BUCKETS) -> int:
    for b in buckets:
        if n <= b:
            return b
    return buckets[-1]


# Fused layers by their first part: built once per model, so that every lean forward over it (the
# target and its early-exit draft) reads the same copy.
_FUSED: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _fused(parts: list[torch.nn.Module]) -> torch.nn.Module:
    hit = _FUSED.get(parts[0])
    # The rest by weak reference (a strong one would keep the key alive); replaced parts (the
    # model quantised since) make a new fusion.
    if hit is None or any(ref() is not p for ref, p in zip(hit[0], parts[1:])):
        hit = (tuple(weakref.ref(p) for p in parts[1:]), fuse_linears(parts))
        _FUSED[parts[0]] = hit
    return hit[1]


def supports(model) -> bool:
    cfg = model.config
    return (getattr(cfg, "model_type", None) in SUPPORTED
            and getattr(cfg, "hidden_act", "silu") == "silu"
            and not getattr(cfg, "pretraining_tp", 1) > 1)


def tree_ancestors(parents: torch.Tensor) -> torch.Tensor:
    """[n, n] bool, True where column j is row i itself or one of its ancestors. ``parents``: [n]
    long (-1 for a root), parents before children. Parent-or-self, squared ceil(log2 n) times:
    after k squarings every ancestor up to 2^k levels up is reached. A few small matmuls, no loop
    over nodes, no host synchronisation."""
    n = parents.shape[0]
    idx = torch.arange(n, device=parents.device)
    reach = (parents[:, None] == idx[None, :]) | (idx[:, None] == idx[None, :])
    reach = reach.to(torch.float32)
    # Compiled with a symbolic block size, the count cannot follow n: enough for the largest
    # block a compiled step takes (longer ones are cut into chunks of BUCKETS[-1]).
    squarings = (math.ceil(math.log2(BUCKETS[-1])) if torch.compiler.is_compiling()
                 else math.ceil(math.log2(n)) if n > 1 else 0)
    for _ in range(squarings):
        reach = (reach @ reach).clamp_max(1.0)
    return reach > 0


class StaticKVCache:
    """keys/values: one [kv_heads, capacity, head_dim] tensor per layer each. Separate tensors, not
    views of one: a compiled step writes its new slots into each in place, which Inductor can
    only do for a whole graph input (writing into a view of a stacked cache is functionalised
    into a copy of the whole stack, per layer). The committed length is kept by the caller."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int, dtype, device):
        shape = (kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]

    def tensors(self):
        return self.keys + self.values

    def grow(self, needed: int) -> None:
        """Reallocate (keeping the contents) to hold ``needed`` slots. Only between sequences:
        a new capacity is a new shape, which a compiled step recompiles for."""
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity)
        for group in (self.keys, self.values):
            for i, old in enumerate(group):
                new = old.new_zeros((old.shape[0], new_cap, old.shape[2]))
                new[:, : old.shape[1]] = old
                group[i] = new

    def keep(self, start: int, keep: list[int]) -> None:
        """Move pending slots ``start + keep[j]`` to ``start + j``; the rest become free. A
        leading run ``0, 1, ..`` is already in place."""
        n = len(keep)
        if n == 0 or keep == list(range(n)):
            return
        src = torch.tensor(keep, device=self.keys[0].device) + start
        for t in self.tensors():
            t[:, start:start + n] = t.index_select(1, src)


class FastLlama(nn.Module):
    """The lean forward over a :class:`StaticKVCache`. A module (holding the model and the fused
    layers as submodules) so that ``torch.compile`` sees the weights as parameters: Inductor's
    freezing can then fold them in as constants and prepack them for the CPU's matmul kernels,
    where plain graph inputs would be read in their stored layout every call."""

    def __init__(self, model, attention=None, exit_layer: int | None = None, adapter=None):
        """``exit_layer``: run only the first N decoder layers, then the final norm and head
        (early exit: the same model as its own cheaper draft). ``adapter``: Kangaroo's adapter
        (:class:`tokctl.decode.kangaroo.KangarooAdapter`: one attention sublayer with its input
        norm, then its own final norm) between the exit and the shared head; its keys and values
        take one more cache layer. ``attention(q, k, v, allowed)`` replaces the dispatcher
        :func:`tokctl.kernels.tree_attention.tree_attention`."""
        if not supports(model):
            raise ValueError(f"FastLlama does not support {type(model).__name__}")
        super().__init__()
        self.model = model
        cfg = model.config
        self.cfg = cfg
        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.layers = list(inner.layers)[:exit_layer] if exit_layer else list(inner.layers)
        self.adapter = adapter
        self.norm = adapter.norm if adapter is not None else inner.norm
        self.lm_head = model.lm_head
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.eps = cfg.rms_norm_eps
        self.attention = attention or tree_attention
        # q, k and v as one matmul, gate and up as another: fewer calls (a one-token step is as
        # much per-call overhead as arithmetic on a CPU) over the same weight bytes.
        self.qkv = nn.ModuleList(_fused([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj])
                                 for l in self.layers)
        self.gate_up = nn.ModuleList(_fused([l.mlp.gate_proj, l.mlp.up_proj]) for l in self.layers)
        if adapter is not None:
            self.adapter_qkv = _fused([adapter.q_proj, adapter.k_proj, adapter.v_proj])
        # Sparse decoding's hook: when set, (layer, q, k, v, allowed) -> out replaces attention.
        self.layer_attention = None
        self.max_positions = getattr(cfg, "max_position_embeddings", None) or 1 << 30
        # cos/sin for every position, from HF's own rotary module (same arithmetic and scaling).
        size = min(self.max_positions, 1 << 15)
        with torch.no_grad():
            pos = torch.arange(size, device=self.device)[None]
            dummy = torch.empty(1, dtype=self.dtype, device=self.device)
            cos, sin = inner.rotary_emb(dummy, pos)
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()

    @property
    def dtype(self):
        return self.embed.dtype

    @property
    def device(self):
        return self.embed.device

    def new_cache(self, capacity: int) -> StaticKVCache:
        return StaticKVCache(len(self.layers) + (self.adapter is not None), self.kv_heads, self.head_dim, capacity,
                             self.dtype, self.device)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # HF's LlamaRMSNorm (normalise in fp32, scale in the model's dtype), as one fused op.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return weight * normed.to(x.dtype)

    def step(self, tokens: torch.Tensor, parents: torch.Tensor, start: torch.Tensor,
             keys: torch.Tensor, values: torch.Tensor, window: int,
             last_only: bool = False) -> torch.Tensor:
        """Logits ([n, V]) for the block ``tokens`` ([n]) shaped as a tree by ``parents`` ([n]),
        after ``start`` committed tokens (0-d long tensor). Their keys and values are written at
        slots ``start .. start + n - 1`` of ``keys``/``values`` (the cache's per-layer tensors, passed so a
        compiled step sees them as inputs it mutates) and stay pending until
        :meth:`StaticKVCache.keep`. Attention reads the first ``window`` slots: the whole
        capacity in a step compiled with static shapes (CUDA graphs), ``start + n`` otherwise."""
        n = tokens.shape[0]
        anc = tree_ancestors(parents)
        positions = start + anc.sum(1) - 1  # depth below the prefix
        slots = start + torch.arange(n, device=tokens.device)
        # Row i sees every committed slot, and the slots of its own ancestors in this block.
        rel = torch.arange(window, device=tokens.device) - start
        in_block = (rel >= 0) & (rel < n)
        tree = anc.gather(1, rel.clamp(0, n - 1).expand(n, window)) & in_block
        allowed = (rel < 0)[None, :] | tree
        return self.forward(tokens, positions, slots, allowed, keys, values, last_only)

    def forward(self, tokens, positions, slots, allowed, keys, values,
                last_only: bool = False) -> torch.Tensor:
        cos, sin = self.cos[positions][None], self.sin[positions][None]  # [1, n, D]
        h = F.embedding(tokens, self.embed)[None]  # [1, n, d]
        for i, layer in enumerate(self.layers):
            h = self._attend(i, h, layer.input_layernorm.weight, self.qkv[i], layer.self_attn.o_proj,
                             cos, sin, slots, keys, values, allowed)
            x = self._rms(h, layer.post_attention_layernorm.weight)
            gate, up = self.gate_up[i](x).chunk(2, dim=-1)
            h = h + layer.mlp.down_proj(F.silu(gate) * up)
        if self.adapter is not None:  # Kangaroo: one attention sublayer, no MLP
            a = self.adapter
            h = self._attend(len(self.layers), h, a.input_layernorm.weight, self.adapter_qkv, a.o_proj,
                             cos, sin, slots, keys, values, allowed)
        if last_only:
            h = h[:, -1:]
        h = self._rms(h, self.norm.weight)
        return self.lm_head(h)[0]

    def _attend(self, i, h, norm_weight, qkv_proj, o_proj, cos, sin, slots, keys, values, allowed):
        """The attention sublayer of layer ``i`` (cache layer ``i``), residual added."""
        n, window = h.shape[1], allowed.shape[1]
        heads, kv_heads, dim = self.num_heads, self.kv_heads, self.head_dim
        x = self._rms(h, norm_weight)
        qkv = qkv_proj(x[0]).view(n, heads + 2 * kv_heads, dim).transpose(0, 1)
        qk = qkv[:heads + kv_heads]
        qk = qk * cos + _rotate_half(qk) * sin  # q's and k's heads rotated together
        q, k, v = qk[:heads], qk[heads:], qkv[heads + kv_heads:]
        keys[i].index_copy_(1, slots, k)
        values[i].index_copy_(1, slots, v)
        kv = (keys[i][:, :window], values[i][:, :window], allowed)
        out = (self.attention(q, *kv) if self.layer_attention is None
               else self.layer_attention(i, q, *kv))
        return h + o_proj(out.transpose(0, 1).reshape(1, n, heads * dim))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
