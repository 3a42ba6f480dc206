"""Tree attention for speculative verification: new tree tokens attend to the whole cached prefix
and to their own ancestors in the draft tree (not to their siblings or cousins).

Shapes: q [H, n, D] (the n new tokens), k and v [Hkv, T, D] (the cache's first T slots: the
committed prefix, the new tokens' keys and values, maybe free slots), ``allowed`` [n, T] bool (True
where token i may see slot j). Grouped-query attention: query head h reads kv head h // (H / Hkv).
:func:`allowed_mask` builds ``allowed`` from a prefix length and an [n, n] tree mask.

:func:`tree_attention` is the one dispatcher the lean Llama forward and the tests call: the Triton
kernel where :func:`tokctl.kernels.use_triton` says so (and not inside ``torch.compile``, which
takes the reference, SDPA, into its graph), :func:`tree_attention_ref` otherwise.

The kernel is a FlashAttention-style pass: one program per (head, block of queries) streams the keys
in blocks with an online softmax, in fp32, so that its memory traffic is the KV cache read once.
"""

from __future__ import annotations

import math

import torch

from tokctl.kernels import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _tree_attention_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr,
        n, total, group, scale,
        sqh, sqn, sqd, skh, skn, skd, svh, svn, svd, smi, smj, soh, son, sod,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        head = tl.program_id(0)
        block = tl.program_id(1)
        kv_head = head // group
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < n
        dim_ok = dims < HEAD_DIM
        q = tl.load(q_ptr + head * sqh + rows[:, None] * sqn + dims[None, :] * sqd,
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start in range(0, total, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < total
            k = tl.load(k_ptr + kv_head * skh + cols[:, None] * skn + dims[None, :] * skd,
                        mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
            v = tl.load(v_ptr + kv_head * svh + cols[:, None] * svn + dims[None, :] * svd,
                        mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
            # Products in the inputs' dtype, accumulated in fp32 (tensor cores for bf16). fp32 inputs
            # get full fp32 products, not TF32: greedy exactness against plain decoding needs them.
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
            ok = tl.load(mask_ptr + rows[:, None] * smi + cols[None, :] * smj,
                         mask=row_ok[:, None] & col_ok[None, :], other=0)
            visible = (ok != 0) & col_ok[None, :] & row_ok[:, None]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            m_i = m_new
        out = acc / tl.where(l_i == 0, 1.0, l_i)[:, None]
        tl.store(out_ptr + head * soh + rows[:, None] * son + dims[None, :] * sod,
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def allowed_mask(prefix: int, tree_mask: torch.Tensor | None, n: int | None = None,
                 device=None) -> torch.Tensor:
    """[n, prefix + n] bool: every row sees the whole prefix, then ``tree_mask`` ([n, n]) among the
    new tokens (None: causal)."""
    if tree_mask is None:
        tree_mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    n = tree_mask.shape[0]
    return torch.cat([torch.ones(n, prefix, dtype=torch.bool, device=tree_mask.device),
                      tree_mask.to(torch.bool)], dim=1)


def tree_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       allowed: torch.Tensor) -> torch.Tensor:
    """Reference: PyTorch SDPA with the explicit boolean mask, in the inputs' dtype (what
    production computes). Grouped-query heads are folded into rows: the query heads that share a
    kv head become one [group * n] block over it. SDPA's ``enable_gqa`` would say the same, but on
    the CPU it sends a masked call to the unfused math kernel, which copies the keys per query head
    (4x slower per layer over a 2k cache for SmolLM2's 9/3 heads)."""
    heads, n, dim = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    if _is_causal_square(allowed):
        # A prefill from slot 0: plain causal attention, which SDPA runs fused with no mask at
        # all. Given the mask, it would build a float copy of it ([group * n, n]) in every layer:
        # most of a long prompt's prefill time.
        if group > 1:
            k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    if group == 1:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(kv_heads, group * n, dim), k, v, attn_mask=allowed.repeat(group, 1))
    return out.view(heads, n, dim)


def tree_attention_exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         allowed: torch.Tensor) -> torch.Tensor:
    """Attention for ``exact=true``: scores, softmax and the weighted sum in float64, the result
    rounded to the inputs' dtype. A tree places its nodes in the cache in tree order, so a node at
    depth d sits at a later slot than the same token does in `ar`'s cache, with masked slots in
    between; bf16 and fp32 kernels group a reduction by slot (vector lanes, paired bf16 products),
    so the same keys summed from other slots round differently. In float64 the order's effect
    (~1e-16 relative) is far below a bf16 or fp32 rounding step: a row's result no longer depends
    on where its keys sit, how many slots the window holds, or how many rows run beside it, unless
    a value lands within that distance of a rounding edge."""
    if _is_causal_square(allowed):
        return tree_attention_ref(q, k, v, allowed)  # a prefill: `ar` and every method share it
    heads, n, dim = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    scores = q.double().reshape(kv_heads, group * n, dim) @ k.double().transpose(1, 2)
    scores = (scores * dim ** -0.5).masked_fill_(~allowed.repeat(group, 1), float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v.double()
    return out.view(heads, n, dim).to(q.dtype)


_causal_masks: dict[tuple[int, str], torch.Tensor] = {}


def _is_causal_square(allowed: torch.Tensor) -> bool:
    n, t = allowed.shape
    if torch.compiler.is_compiling() or n != t or n < 2:
        return False
    key = (n, str(allowed.device))
    if key not in _causal_masks:
        _causal_masks.clear()  # one prompt length at a time: keep only the last
        _causal_masks[key] = torch.ones(n, n, dtype=torch.bool, device=allowed.device).tril_()
    return torch.equal(allowed, _causal_masks[key])


def tree_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                          block_m: int = 16, block_n: int | None = None) -> torch.Tensor:
    heads, n, dim = q.shape
    kv_heads = k.shape[0]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group over {kv_heads} kv heads")
    if allowed.shape != (n, k.shape[1]):
        raise ValueError(f"mask {tuple(allowed.shape)} does not match {n} queries over "
                         f"{k.shape[1]} keys")
    if block_n is None:
        # Measured on an H200 (64 tree tokens over 2048 cached): 128 keys a step for 64-dim heads
        # (35 us against 52 us at 32), 64 for 128-dim heads (53 us against 69 us).
        block_n = 128 if dim <= 64 else 64
    mask = allowed.to(torch.int8).contiguous()
    out = torch.empty_like(q)
    grid = (heads, triton.cdiv(n, block_m))
    _tree_attention_kernel[grid](
        q, k, v, mask, out, n, k.shape[1], heads // kv_heads, 1.0 / math.sqrt(dim),
        *q.stride(), *k.stride(), *v.stride(), *mask.stride(), *out.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(dim)), HEAD_DIM=dim,  # tl.dot: dims >= 16
        IEEE=q.dtype == torch.float32,
    )
    return out


def tree_attention(q, k, v, allowed):
    """Dispatch: the Triton kernel on a GPU (or when forced) in eager code, the reference
    otherwise (and always inside torch.compile, where SDPA joins the graph)."""
    if not torch.compiler.is_compiling() and use_triton(q, k, v):
        return tree_attention_triton(q, k, v, allowed)
    return tree_attention_ref(q, k, v, allowed)


def bench_cases(device: str):
    """Verification of a 64-node tree over a 2k-token cache, SmolLM2-135M's and Llama-8B's heads."""
    cases = []
    for label, heads, kv_heads, dim, prefix, n in [("smollm2 H9/3 D64 P2048 n64", 9, 3, 64, 2048, 64),
                                                   ("llama8b H32/8 D128 P2048 n64", 32, 8, 128, 2048, 64)]:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(heads, n, dim, device=device, generator=g, dtype=torch.bfloat16)
        k = torch.randn(kv_heads, prefix + n, dim, device=device, generator=g, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        ancestors = torch.eye(n, dtype=torch.bool)  # a binary tree: node i's parent is (i+1)//2-1
        for i in range(1, n):
            ancestors[i] |= ancestors[(i + 1) // 2 - 1]
        mask = allowed_mask(prefix, ancestors).to(device)
        cases.append((label, lambda q=q, k=k, v=v, m=mask: tree_attention_triton(q, k, v, m),
                      lambda q=q, k=k, v=v, m=mask: tree_attention_ref(q, k, v, m)))
    return cases
