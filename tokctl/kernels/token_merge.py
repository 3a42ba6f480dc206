"""ToMe's merge step: bipartite soft matching and size-weighted scatter-reduce.

Tokens (without the protected prefix) alternate between set A (even positions) and set B (odd).
Every A token finds its most similar B token (cosine similarity of the metric, usually the
attention keys); the ``r`` A tokens with the highest such similarity are merged into their B
match, each weighted by its size (how many patches it already stands for); the other A tokens
stay as they are. Output order: unmerged A tokens in their original order, then all B tokens.

Two Triton kernels do the heavy parts: ``_best_match_kernel`` (similarity + best match per A
token, tiled so the full |A|x|B| score matrix is never stored) and ``_scatter_add_kernel`` (the
weighted sum of the merged A tokens into their destinations). Sorting the edges and the final
division stay in torch. ``token_merge_ref`` is the PyTorch reference; ``token_merge`` dispatches
by :func:`kernels.use_triton`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from tokctl.kernels import use_triton

try:  # Triton is optional at run time: the reference covers CPUs without it.
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001
    triton = None


class MergeResult(NamedTuple):
    x: torch.Tensor  # (B, N - r, C) merged tokens, size-weighted means
    size: torch.Tensor  # (B, N - r, 1) patches each token stands for
    unm_idx: torch.Tensor  # (B, |A| - r) A positions kept as they are, ascending
    src_idx: torch.Tensor  # (B, r) A positions merged away
    dst_idx: torch.Tensor  # (B, r) the B position each of them went into


def _order_edges(node_max: torch.Tensor, node_idx: torch.Tensor, r: int):
    edge_idx = node_max.argsort(dim=-1, descending=True)
    unm_idx = edge_idx[:, r:].sort(dim=-1).values
    src_idx = edge_idx[:, :r]
    dst_idx = node_idx.gather(dim=-1, index=src_idx)
    return unm_idx, src_idx, dst_idx


def _gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.gather(dim=1, index=idx[..., None].expand(-1, -1, t.shape[-1]))


def best_match_ref(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row of ``a`` (B, Na, C), the highest dot product with a row of ``b`` and its index."""
    scores = a.float() @ b.float().transpose(-1, -2)
    return scores.max(dim=-1)


def token_merge_ref(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int) -> MergeResult:
    metric = metric / metric.norm(dim=-1, keepdim=True)
    node_max, node_idx = best_match_ref(metric[:, ::2], metric[:, 1::2])
    unm_idx, src_idx, dst_idx = _order_edges(node_max, node_idx, r)
    x_a, x_b = x[:, ::2], x[:, 1::2]
    s_a, s_b = size[:, ::2].to(torch.float32), size[:, 1::2].to(torch.float32)
    weighted_a = x_a.to(torch.float32) * s_a
    total = (x_b.to(torch.float32) * s_b).scatter_add(
        1, dst_idx[..., None].expand(-1, -1, x.shape[-1]), _gather_rows(weighted_a, src_idx))
    size_b = s_b.scatter_add(1, dst_idx[..., None], _gather_rows(s_a, src_idx))
    merged_x = torch.cat([_gather_rows(x_a.to(torch.float32), unm_idx), total / size_b], dim=1)
    merged_size = torch.cat([_gather_rows(s_a, unm_idx), size_b], dim=1)
    return MergeResult(merged_x.to(x.dtype), merged_size.to(size.dtype), unm_idx, src_idx, dst_idx)


if triton is not None:

    @triton.jit
    def _best_match_kernel(a_ptr, b_ptr, max_ptr, idx_ptr, NA, NB, C,
                           s_ab, s_an, s_ac, s_bb, s_bn, s_bc,
                           BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                           IEEE: tl.constexpr):
        batch = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
        row_ok = rows < NA
        best = tl.full((BLOCK_A,), float("-inf"), tl.float32)
        best_idx = tl.zeros((BLOCK_A,), tl.int32)
        for start in range(0, NB, BLOCK_B):
            cols = start + tl.arange(0, BLOCK_B)
            col_ok = cols < NB
            acc = tl.zeros((BLOCK_A, BLOCK_B), tl.float32)
            for c0 in range(0, C, BLOCK_C):
                ch = c0 + tl.arange(0, BLOCK_C)
                ch_ok = ch < C
                a = tl.load(a_ptr + batch * s_ab + rows[:, None] * s_an + ch[None, :] * s_ac,
                            mask=row_ok[:, None] & ch_ok[None, :], other=0.0)
                b = tl.load(b_ptr + batch * s_bb + cols[:, None] * s_bn + ch[None, :] * s_bc,
                            mask=col_ok[:, None] & ch_ok[None, :], other=0.0)
                # Half-precision inputs multiply exactly into the fp32 accumulator on tensor cores;
                # fp32 inputs keep fp32 products (TF32 would reorder near-tied matches).
                if IEEE:
                    acc += tl.dot(a, tl.trans(b), input_precision="ieee")
                else:
                    acc += tl.dot(a, tl.trans(b))
            acc = tl.where(col_ok[None, :], acc, float("-inf"))
            tile_max = tl.max(acc, axis=1)
            # First column reaching the tile's maximum (torch.max's tie rule).
            is_max = acc == tile_max[:, None]
            tile_idx = tl.min(tl.where(is_max, cols[None, :], NB), axis=1)
            better = tile_max > best
            best_idx = tl.where(better, tile_idx, best_idx)
            best = tl.where(better, tile_max, best)
        tl.store(max_ptr + batch * NA + rows, best, mask=row_ok)
        tl.store(idx_ptr + batch * NA + rows, best_idx, mask=row_ok)

    @triton.jit
    def _scatter_add_kernel(src_ptr, src_idx_ptr, dst_idx_ptr, out_ptr, R, C,
                            s_sb, s_sn, s_sc, s_ob, s_on, s_oc, BLOCK_C: tl.constexpr):
        batch = tl.program_id(0)
        j = tl.program_id(1)
        src_row = tl.load(src_idx_ptr + batch * R + j)
        dst_row = tl.load(dst_idx_ptr + batch * R + j)
        for c0 in range(0, C, BLOCK_C):
            ch = c0 + tl.arange(0, BLOCK_C)
            ok = ch < C
            val = tl.load(src_ptr + batch * s_sb + src_row * s_sn + ch * s_sc, mask=ok, other=0.0)
            tl.atomic_add(out_ptr + batch * s_ob + dst_row * s_on + ch * s_oc,
                          val.to(tl.float32), mask=ok)


def best_match_triton(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, na, c = a.shape
    nb = b.shape[1]
    node_max = torch.empty(batch, na, device=a.device, dtype=torch.float32)
    node_idx = torch.empty(batch, na, device=a.device, dtype=torch.int32)
    if b.dtype != a.dtype:
        b = b.to(a.dtype)
    # 16x16 tiles of fp32 products ran at half the speed of torch's matmul on an H200 (ViT-B/16,
    # batch 64); larger tiles and tensor-core products for half-precision metrics since.
    block_a, block_b = 32, 64
    block_c = max(16, min(64, triton.next_power_of_2(c)))  # tl.dot needs every dim >= 16
    grid = (batch, triton.cdiv(na, block_a))
    _best_match_kernel[grid](a, b, node_max, node_idx, na, nb, c,
                             *a.stride(), *b.stride(),
                             BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_C=block_c,
                             IEEE=a.dtype == torch.float32)
    return node_max, node_idx.long()


def scatter_add_triton(src: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor,
                       out: torch.Tensor) -> torch.Tensor:
    """out[b, dst_idx[b, j]] += src[b, src_idx[b, j]] for every j, in place on fp32 ``out``."""
    batch, r = src_idx.shape
    if r == 0:
        return out
    c = src.shape[-1]
    src_idx = src_idx.to(torch.int32).contiguous()
    dst_idx = dst_idx.to(torch.int32).contiguous()
    _scatter_add_kernel[(batch, r)](src, src_idx, dst_idx, out, r, c, *src.stride(), *out.stride(),
                                    BLOCK_C=min(128, triton.next_power_of_2(c)))
    return out


def token_merge_triton(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int) -> MergeResult:
    metric = metric / metric.norm(dim=-1, keepdim=True)
    node_max, node_idx = best_match_triton(metric[:, ::2], metric[:, 1::2])
    unm_idx, src_idx, dst_idx = _order_edges(node_max, node_idx, r)
    x_a, x_b = x[:, ::2], x[:, 1::2]
    s_a, s_b = size[:, ::2].to(torch.float32), size[:, 1::2].to(torch.float32)
    weighted_a = (x_a.to(torch.float32) * s_a).contiguous()
    total = (x_b.to(torch.float32) * s_b).contiguous()
    size_b = s_b.contiguous()
    scatter_add_triton(weighted_a, src_idx, dst_idx, total)
    scatter_add_triton(s_a.contiguous(), src_idx, dst_idx, size_b)
    merged_x = torch.cat([_gather_rows(x_a.to(torch.float32), unm_idx), total / size_b], dim=1)
    merged_size = torch.cat([_gather_rows(s_a, unm_idx), size_b], dim=1)
    return MergeResult(merged_x.to(x.dtype), merged_size.to(size.dtype), unm_idx, src_idx, dst_idx)


def token_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int) -> MergeResult:
    """Merge ``r`` tokens of ``x`` (B, N, C) with sizes (B, N, 1) by ToMe's matching on ``metric``."""
    if not 0 <= r <= x.shape[1] // 2:
        raise ValueError(f"r={r} must be between 0 and half the {x.shape[1]} tokens")
    if triton is not None and use_triton(x, metric):
        return token_merge_triton(x, size, metric, r)
    return token_merge_ref(x, size, metric, r)


def bench_cases(device: str):
    """ToMe's merge step at the shapes of a ViT-B/16 at 224 px (197 tokens, 768 channels, r=13;
    the metric is the 64-dim-per-head keys, 768 in all) and a ViT-L/16 at 384 px (577, 1024, r=8),
    batch 64, in fp16 as ToMe's throughput runs are."""
    cases = []
    for label, batch, n, c, r in [("vit-b16 B64 N197 C768 r13 fp16", 64, 197, 768, 13),
                                  ("vit-l16@384 B64 N577 C1024 r8 fp16", 64, 577, 1024, 8)]:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(batch, n, c, device=device, generator=g, dtype=torch.float16)
        metric = torch.randn(batch, n, c, device=device, generator=g, dtype=torch.float16)
        size = torch.ones(batch, n, 1, device=device, dtype=torch.float16)
        cases.append((label, lambda x=x, s=size, m=metric, r=r: token_merge_triton(x, s, m, r),
                      lambda x=x, s=size, m=metric, r=r: token_merge_ref(x, s, m, r)))
    return cases
