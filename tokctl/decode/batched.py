"""A batch of sequences on the lean Llama forward: left-padded prompts, one KV cache, key masks.

Every row writes its keys and values at the same slot each step (prompts are left-padded to one
width), so a step is one [B, 1] block; a row's positions count only its own tokens, and padded
slots are masked out of every attention. ``first_layer`` runs a step from that layer up, the
embedding fed straight into it (SkipDecode bypasses the bottom layers): the layers below keep
no entry for that slot, which no later step reads as long as ``first_layer`` never decreases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokctl.models.fast_llama import FastLlama, _rotate_half


class BatchedLlama:
    def __init__(self, model):
        self.fast = FastLlama(model)
        self.num_layers = len(self.fast.layers)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.lowest_layer = 0

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], capacity: int) -> torch.Tensor:
        """Start a batch; the logits after each prompt's last token ([B, V])."""
        f = self.fast
        b, width = len(prompts), max(len(p) for p in prompts)
        shape = (self.num_layers, b, f.kv_heads, width + capacity, f.head_dim)
        self.keys = torch.zeros(shape, dtype=f.dtype, device=f.device)
        self.values = torch.zeros_like(self.keys)
        self.valid = torch.zeros(b, width + capacity, dtype=torch.bool, device=f.device)
        pad = torch.tensor([width - len(p) for p in prompts], device=f.device)
        ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=f.device)
        self.valid[:, :width] = torch.arange(width, device=f.device)[None] >= pad[:, None]
        positions = (torch.arange(width, device=f.device)[None] - pad[:, None]).clamp_min(0)
        self.length = 0
        self.lowest_layer = 0
        logits = self._run(ids, positions, 0)
        self.next_pos = torch.tensor([len(p) for p in prompts], device=f.device)
        self.length = width
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, first_layer: int = 0) -> torch.Tensor:
        """One token per row ([B]) from ``first_layer`` up; the next logits ([B, V])."""
        if first_layer < self.lowest_layer:
            raise ValueError("first_layer may not decrease within a batch (its KV would be missing)")
        self.lowest_layer = first_layer
        self.valid[:, self.length] = True
        logits = self._run(tokens.view(-1, 1), self.next_pos[:, None], first_layer)
        self.length += 1
        self.next_pos += 1
        return logits

    def _run(self, ids, positions, first_layer):
        f = self.fast
        b, n = ids.shape
        s0, window = self.length, self.length + n
        heads, kv_heads, dim = f.num_heads, f.kv_heads, f.head_dim
        cos, sin = f.cos[positions][:, None], f.sin[positions][:, None]  # [B, 1, n, D]
        q_slot = s0 + torch.arange(n, device=ids.device)
        k_slot = torch.arange(window, device=ids.device)
        causal = k_slot[None, :] <= q_slot[:, None]
        # A padded row sees itself, so that no row is left without keys (NaN would leak through
        # the masked products into the real rows).
        mask = (self.valid[:, None, None, :window] & causal) | (k_slot[None, :] == q_slot[:, None])
        h = F.embedding(ids, f.embed)  # [B, n, d]
        for i in range(first_layer, self.num_layers):
            layer = f.layers[i]
            x = f._rms(h, layer.input_layernorm.weight)
            qkv = f.qkv[i](x).view(b, n, heads + 2 * kv_heads, dim).transpose(1, 2)
            qk = qkv[:, :heads + kv_heads]
            qk = qk * cos + _rotate_half(qk) * sin
            q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads:]
            self.keys[i, :, :, s0:window] = k
            self.values[i, :, :, s0:window] = v
            rep = heads // kv_heads
            keys = self.keys[i, :, :, :window].repeat_interleave(rep, dim=1)
            values = self.values[i, :, :, :window].repeat_interleave(rep, dim=1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            h = h + layer.self_attn.o_proj(out.transpose(1, 2).reshape(b, n, -1))
            x = f._rms(h, layer.post_attention_layernorm.weight)
            gate, up = f.gate_up[i](x).chunk(2, dim=-1)
            h = h + layer.mlp.down_proj(F.silu(gate) * up)
        h = f._rms(h[:, -1], f.norm.weight)
        return f.lm_head(h)


def decode_batch(engine: BatchedLlama, prompts: list[list[int]], settings, generator,
                 first_layer_at=lambda t: 0) -> list[list[int]]:
    """Tokens for every prompt of a batch, one step for all rows at a time, until every row has
    met EOS or ``max_new_tokens``; ``first_layer_at(t)``: the first layer run for the t-th new
    token (t = 1, 2, ..; the first comes from the prompt's full prefill)."""
    from tokctl.decode.sampling import probs

    s = settings.sampling

    def pick(logits):
        if s.greedy:
            return logits.argmax(-1)
        return torch.multinomial(probs(logits, s), 1, generator=generator).view(-1)

    logits = engine.prefill(prompts, capacity=settings.max_new_tokens + 1)
    outs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for t in range(settings.max_new_tokens):
        tokens = pick(logits)
        for row, tok in enumerate(tokens.tolist()):
            if not done[row]:
                outs[row].append(tok)
                done[row] = tok in settings.eos_ids or len(outs[row]) >= settings.max_new_tokens
        if all(done):
            break
        logits = engine.step(tokens, first_layer_at(t + 1))
    return outs
