"""Decode attention over a gathered set of cached positions (sparse decoding's read path).

Shapes: q [H, D] (the one new token's query heads), k and v [Hkv, T, D] (the cache's first T
slots), ``index`` [Hkv, K] long: the slots each kv head reads, -1 for an unused entry (so that the
lists keep one shape while the set they name grows or shrinks). Grouped-query attention: query head
h reads kv head h // (H / Hkv) and that head's list. Output [H, D]. A list that is all -1 gives 0.

:func:`gathered_attention` dispatches like every kernel here (:func:`tokctl.kernels.use_triton`):
the Triton kernel on a GPU or when forced, :func:`gathered_attention_ref` otherwise.

The kernel runs one program per kv head: the group's query heads share every key and value row
it gathers, so each selected row is read from memory once, the whole point of sparse decoding
(its cost is the rows read, not the arithmetic). Scores go through an online softmax in fp32.
"""

from __future__ import annotations

import math

import torch

from tokctl.kernels import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _gathered_attention_kernel(
        q_ptr, k_ptr, v_ptr, idx_ptr, out_ptr,
        count, group, scale,
        sqh, sqd, skh, skn, skd, svh, svn, svd, sih, sik, soh, sod,
        BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):
        kv_head = tl.program_id(0)
        heads = kv_head * group + tl.arange(0, BLOCK_G)
        dims = tl.arange(0, BLOCK_D)
        head_ok = tl.arange(0, BLOCK_G) < group
        dim_ok = dims < HEAD_DIM
        q = tl.load(q_ptr + heads[:, None] * sqh + dims[None, :] * sqd,
                    mask=head_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for start in range(0, count, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            slot = tl.load(idx_ptr + kv_head * sih + j * sik, mask=j < count, other=-1)
            used = slot >= 0
            safe = tl.where(used, slot, 0)
            k = tl.load(k_ptr + kv_head * skh + safe[:, None] * skn + dims[None, :] * skd,
                        mask=used[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
            v = tl.load(v_ptr + kv_head * svh + safe[:, None] * svn + dims[None, :] * svd,
                        mask=used[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
            # One query row per head: a broadcast product and a sum, no tl.dot (whose 16-row
            # minimum would waste most of a tile on a group of 3 heads).
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
            s = tl.where(used[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m_i = m_new
        out = acc / tl.where(l_i == 0, 1.0, l_i)[:, None]
        tl.store(out_ptr + heads[:, None] * soh + dims[None, :] * sod,
                 out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & dim_ok[None, :])


def _check(q, k, v, index):
    heads, dim = q.shape
    kv_heads = k.shape[0]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group over {kv_heads} kv heads")
    if k.shape != v.shape or k.shape[2] != dim:
        raise ValueError(f"keys {tuple(k.shape)} / values {tuple(v.shape)} do not fit queries "
                         f"{tuple(q.shape)}")
    if index.dim() != 2 or index.shape[0] != kv_heads:
        raise ValueError(f"index {tuple(index.shape)}: expected one list per kv head ({kv_heads})")


def gathered_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           index: torch.Tensor) -> torch.Tensor:
    """Reference: gather the listed rows, then plain softmax attention in fp32."""
    _check(q, k, v, index)
    heads, dim = q.shape
    kv_heads = k.shape[0]
    used = index >= 0
    rows = index.clamp_min(0)[:, :, None].expand(-1, -1, dim)
    ks = k.gather(1, rows).float()  # [Hkv, K, D]
    vs = v.gather(1, rows).float()
    qg = q.float().view(kv_heads, heads // kv_heads, dim)
    s = torch.einsum("hgd,hkd->hgk", qg, ks) / math.sqrt(dim)
    s = s.masked_fill(~used[:, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # an empty list: all -inf, no keys, zero out
    return torch.einsum("hgk,hkd->hgd", p, vs).reshape(heads, dim).to(q.dtype)


def gathered_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              index: torch.Tensor, block_n: int = 64) -> torch.Tensor:
    _check(q, k, v, index)
    heads, dim = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    out = torch.empty_like(q)
    _gathered_attention_kernel[(kv_heads,)](
        q, k, v, index, out, index.shape[1], group, 1.0 / math.sqrt(dim),
        *q.stride(), *k.stride(), *v.stride(), *index.stride(), *out.stride(),
        BLOCK_G=triton.next_power_of_2(group), BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(dim), HEAD_DIM=dim,
    )
    return out


def gathered_attention(q, k, v, index):
    """Dispatch: the Triton kernel on a GPU (or when forced), the reference otherwise."""
    if use_triton(q, k, v, index):
        return gathered_attention_triton(q, k, v, index)
    return gathered_attention_ref(q, k, v, index)


def bench_cases(device: str):
    """One decode step reading 256 of 8192 cached positions per kv head (TidalDecode's default
    budget), SmolLM2-135M's and Llama-8B's heads."""
    cases = []
    for label, heads, kv_heads, dim, total, count in [
            ("smollm2 H9/3 D64 T8192 K256", 9, 3, 64, 8192, 256),
            ("llama8b H32/8 D128 T8192 K256", 32, 8, 128, 8192, 256)]:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(heads, dim, device=device, generator=g, dtype=torch.bfloat16)
        k = torch.randn(kv_heads, total, dim, device=device, generator=g, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        idx = torch.stack([torch.randperm(total, device=device, generator=g)[:count]
                           for _ in range(kv_heads)])
        cases.append((label, lambda q=q, k=k, v=v, i=idx: gathered_attention_triton(q, k, v, i),
                      lambda q=q, k=k, v=v, i=idx: gathered_attention_ref(q, k, v, i)))
    return cases
