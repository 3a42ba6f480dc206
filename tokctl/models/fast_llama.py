"""A lean forward pass for Llama-architecture models over a static KV cache (gpt-fast's idea).

It uses the Hugging Face model's own parameters (no copy) and the same arithmetic in the same
order as transformers' LlamaModel, so its logits match HF's to float rounding. What it removes is
per-call overhead: no mask construction, no cache objects, no output dataclasses. On a 2-core CPU
that overhead is about a third of a one-token step of SmolLM2-135M.

The static cache also makes speculative decoding cheap: tree tokens are written after the
committed prefix, and committing an accepted path is one gather of those slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED = ("llama",)


def supports(model) -> bool:
    cfg = model.config
    return (getattr(cfg, "model_type", None) in SUPPORTED
            and getattr(cfg, "hidden_act", "silu") == "silu"
            and not getattr(cfg, "pretraining_tp", 1) > 1)


class StaticKVCache:
    """keys/values: one [1, kv_heads, capacity, head_dim] tensor per layer. The committed length
    is kept by the caller, which passes it to every forward."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int, dtype, device):
        self.shape = (1, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def capacity(self) -> int:
        return self.shape[2]

    def grow(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_zeros(old.shape[:2] + (new_cap,) + old.shape[3:])
                new[:, :, : old.shape[2]] = old
                store[i] = new
        self.shape = self.shape[:2] + (new_cap,) + self.shape[3:]

    def keep(self, start: int, keep: torch.Tensor) -> None:
        """Move pending slots ``start + keep[j]`` to ``start + j``; the rest become free."""
        n = int(keep.numel())
        contiguous = n == 0 or bool((keep == torch.arange(n, device=keep.device)).all())
        if not contiguous:
            src = keep + start
            for store in (self.keys, self.values):
                for t in store:
                    t[:, :, start:start + n] = t.index_select(2, src)


class FastLlama:
    """Forward over a :class:`StaticKVCache`; ``attention`` is swappable (e.g. a Triton kernel)."""

    def __init__(self, model, attention=None, exit_layer: int | None = None):
        """``exit_layer``: run only the first N decoder layers, then the final norm and head
        (early exit: the same model as its own cheaper draft)."""
        if not supports(model):
            raise ValueError(f"FastLlama does not support {type(model).__name__}")
        self.model = model
        cfg = model.config
        self.cfg = cfg
        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.layers = list(inner.layers)[:exit_layer] if exit_layer else list(inner.layers)
        self.norm = inner.norm
        self.lm_head = model.lm_head.weight
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.eps = cfg.rms_norm_eps
        self.rotary = inner.rotary_emb
        self.attention = attention or default_attention
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.max_positions = getattr(cfg, "max_position_embeddings", None) or 1 << 30

    @property
    def dtype(self):
        return self.embed.dtype

    @property
    def device(self):
        return self.embed.device

    def new_cache(self, capacity: int) -> StaticKVCache:
        return StaticKVCache(len(self.layers), self.kv_heads, self.head_dim, capacity,
                             self.dtype, self.device)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for these positions, from a table made by HF's own rotary module (same
        arithmetic, same scaling rules)."""
        need = int(positions.max()) + 1
        if self._rope_cache is None or self._rope_cache[0].shape[0] < need:
            size = max(need, 1024, 2 * (0 if self._rope_cache is None else self._rope_cache[0].shape[0]))
            pos = torch.arange(size, device=self.device)[None]
            dummy = torch.empty(1, dtype=self.dtype, device=self.device)
            cos, sin = self.rotary(dummy, pos)
            self._rope_cache = (cos[0], sin[0])
        cos, sin = self._rope_cache
        return cos[positions], sin[positions]

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x.to(dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache,
                start: int, tree_mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits for ``tokens`` ([n]) at ``positions`` ([n]), written at cache slots from ``start``
        (the committed length).

        ``tree_mask`` ([n, n] bool, True = may attend) says which new tokens see which; None means
        causal among them. Every new token sees the whole committed prefix. The new slots stay
        pending until ``cache.keep``.
        """
        n = tokens.shape[0]
        cache.grow(start + n)
        cos, sin = self._rope(positions)
        cos, sin = cos[None, None], sin[None, None]  # [1, 1, n, D]
        h = F.embedding(tokens, self.embed)[None]  # [1, n, d]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = self._rms(h, layer.input_layernorm.weight)
            q = attn.q_proj(x).view(1, n, self.num_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, n, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(1, n, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            cache.keys[i][:, :, start:start + n] = k
            cache.values[i][:, :, start:start + n] = v
            out = self.attention(q, cache.keys[i][:, :, : start + n], cache.values[i][:, :, : start + n],
                                 start, tree_mask)
            h = h + attn.o_proj(out.transpose(1, 2).reshape(1, n, -1))
            x = self._rms(h, layer.post_attention_layernorm.weight)
            mlp = layer.mlp
            h = h + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        if last_only:
            h = h[:, -1:]
        h = self._rms(h, self.norm.weight)
        return F.linear(h, self.lm_head)[0]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_mask(prefix: int, n: int, tree_mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """[n, prefix + n] bool mask: all of the prefix, then causal or tree among the new tokens."""
    if tree_mask is None:
        if n == 1:
            return None
        new = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    else:
        new = tree_mask
    return torch.cat([torch.ones(n, prefix, dtype=torch.bool, device=device), new], dim=1)


def sdpa_attention(q, k, v, prefix: int, tree_mask):
    """Reference attention: PyTorch SDPA with grouped-query heads and an explicit mask."""
    n = q.shape[2]
    mask = attention_mask(prefix, n, tree_mask, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                          enable_gqa=k.shape[1] != q.shape[1])


def default_attention(q, k, v, prefix: int, tree_mask):
    """The Triton tree-attention kernel where the dispatch rule says so (a GPU, or forced), SDPA
    otherwise."""
    from tokctl.kernels import use_triton

    if use_triton(q):
        from tokctl.kernels.tree_attention import tree_attention_triton

        return tree_attention_triton(q[0], k[0], v[0], prefix, tree_mask)[None]
    return sdpa_attention(q, k, v, prefix, tree_mask)
