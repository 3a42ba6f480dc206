"""ToMe's merge step: bipartite soft matching and a size-weighted merge, with ToMe's conventions.

The conventions of the official code (facebookresearch/ToMe, ``tome/merge.py``), which decide
*which* tokens merge and in what order the survivors come, and so every later layer:

* The two sets alternate over the **whole** sequence, protected tokens included: set A is
  positions 0, 2, 4, ... and set B positions 1, 3, 5, ... (with a [CLS] token at 0, the first
  patch is in B, not A).
* The first ``protected`` positions ([CLS], a distillation token, registers) are never merged:
  those in A get a score of -inf against every B token (never a source), those in B get -inf
  from every A token (never a destination).
* Every A token finds its most similar B token (cosine similarity of the metric); the ``r`` A
  tokens with the highest such similarity merge into their match (size-weighted sum over the
  size sum, computed as ToMe does: merge(x * size) / merge(size)).
* Output order: the protected tokens in their input order, then the unmerged A tokens, then all
  B tokens. With protected tokens the unmerged A tokens are in input order; without any, in
  descending order of their best similarity (the official code sorts only to keep [CLS] first).
* ``r`` may be at most ``(N - protected) // 2``: :func:`max_r`; callers lower r to it as ToMe does.

Two implementations: ``token_merge_ref`` in torch (what ``torch.compile`` traces and fuses), and
``token_merge_triton``: three Triton kernels that never build the |A|x|B| score matrix
(``_best_match_kernel``: cosine similarity and best match per A token, tiled, protected tokens
masked; ``_select_kernel``: the top-r edges by rank, the unmerged order and every A token's output
row; ``_merge_rows_kernel``: every token times its size added into its output row, sizes too).
``token_merge`` dispatches by :func:`tokctl.kernels.use_triton` unless told.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import torch

from tokctl.kernels import use_triton

try:  # Triton is optional at run time: the reference covers CPUs without it.
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001
    triton = None

# How often each implementation ran in this process (tests check the kernel path really ran).
CALLS: Counter = Counter()


class MergeResult(NamedTuple):
    x: torch.Tensor  # (B, N - r, C) merged tokens, size-weighted means
    size: torch.Tensor  # (B, N - r, 1) patches each token stands for
    unm_idx: torch.Tensor  # (B, |A| - r) A positions (of the whole sequence's A set) kept as they are
    src_idx: torch.Tensor  # (B, r) A positions merged away, most similar first
    dst_idx: torch.Tensor  # (B, r) the B position each of them went into


def max_r(tokens: int, protected: int) -> int:
    """The most tokens one merge may remove: half of the unprotected ones (ToMe's limit)."""
    return max(0, (tokens - protected) // 2)


def _prefix_split(protected: int) -> tuple[int, int]:
    """How many protected tokens fall in A (even positions) and in B (odd positions)."""
    return (protected + 1) // 2, protected // 2


def assemble(unm: torch.Tensor, dst: torch.Tensor, protected: int) -> torch.Tensor:
    """The merged sequence from the kept A rows and the B rows: protected tokens first, in their
    input order (A and B alternate there), then the other kept A rows, then the other B rows."""
    if protected <= 1:  # nothing to interleave: [CLS] (if any) is unm's first row
        return torch.cat([unm, dst], dim=1)
    pa, pb = _prefix_split(protected)
    pieces = [(unm if i % 2 == 0 else dst)[:, i // 2:i // 2 + 1] for i in range(protected)]
    return torch.cat(pieces + [unm[:, pa:], dst[:, pb:]], dim=1)


def merge_apply(t: torch.Tensor, unm_idx: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor,
                protected: int, reduce: str = "sum") -> torch.Tensor:
    """Apply a merge (its indices) to any per-token tensor (B, N, D): ``reduce`` says how the
    sources combine with their destination ('sum' for weighted sums, 'amax' for source maps)."""
    a, b = t[:, ::2], t[:, 1::2]
    d = t.shape[-1]
    unm = a.gather(1, unm_idx[..., None].expand(-1, -1, d))
    src = a.gather(1, src_idx[..., None].expand(-1, -1, d))
    b = b.scatter_reduce(1, dst_idx[..., None].expand(-1, -1, d), src, reduce=reduce)
    return assemble(unm, b, protected)


# ------------------------------------------------------------------------------------ reference
def best_match_ref(metric: torch.Tensor, protected: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """For every A token of ``metric`` (B, N, C), its highest cosine similarity to a B token and
    that token's B position; protected tokens masked with -inf (ToMe's scores, in the metric's
    dtype as the official code computes them)."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    pa, pb = _prefix_split(protected)
    if pa:
        scores[:, :pa, :] = float("-inf")
    if pb:
        scores[:, :, :pb] = float("-inf")
    return scores.max(dim=-1)


def select_ref(node_max: torch.Tensor, node_idx: torch.Tensor, r: int, protected: int):
    """(unm_idx, src_idx, dst_idx): the r best edges, highest first (ties: lower position first)."""
    edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    if protected:  # keep the protected tokens (the lowest A positions) at the front
        unm_idx = unm_idx.sort(dim=-1).values
    return unm_idx, src_idx, node_idx.gather(-1, src_idx)


def _weighted_merge(x, size, unm_idx, src_idx, dst_idx, protected) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.ones_like(x[..., :1], dtype=torch.float32) if size is None else size.float()
    total = merge_apply(x.float() * s, unm_idx, src_idx, dst_idx, protected)
    merged_size = merge_apply(s, unm_idx, src_idx, dst_idx, protected)
    return (total / merged_size).to(x.dtype), merged_size


def token_merge_ref(x: torch.Tensor, size: torch.Tensor | None, metric: torch.Tensor, r: int,
                    protected: int = 0) -> MergeResult:
    if not torch.compiler.is_compiling():  # a counter inside a graph would be guarded on
        CALLS["torch"] += 1
    node_max, node_idx = best_match_ref(metric, protected)
    unm_idx, src_idx, dst_idx = select_ref(node_max, node_idx, r, protected)
    merged_x, merged_size = _weighted_merge(x, size, unm_idx, src_idx, dst_idx, protected)
    return MergeResult(merged_x, merged_size.to(size.dtype if size is not None else torch.float32),
                       unm_idx, src_idx, dst_idx)


# --------------------------------------------------------------------------------------- Triton
if triton is not None:

    @triton.jit
    def _best_match_kernel(m_ptr, max_ptr, idx_ptr, NA, NB, C, PA, PB, s_b, s_n, s_c,
                           BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                           IEEE: tl.constexpr):
        # A token i is sequence position 2i, B token j position 2j+1.
        batch = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
        row_ok = rows < NA
        base = m_ptr + batch * s_b
        # Inverse norms of this tile's A rows (cosine similarity without a normalised copy).
        sq_a = tl.zeros((BLOCK_A,), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            ch = c0 + tl.arange(0, BLOCK_C)
            a = tl.load(base + (2 * rows[:, None]) * s_n + ch[None, :] * s_c,
                        mask=row_ok[:, None] & (ch < C)[None, :], other=0.0).to(tl.float32)
            sq_a += tl.sum(a * a, axis=1)
        inv_a = 1.0 / tl.sqrt(tl.where(row_ok, sq_a, 1.0))  # masked rows: no 0 * inf
        best = tl.full((BLOCK_A,), float("-inf"), tl.float32)
        best_idx = tl.zeros((BLOCK_A,), tl.int32)
        for start in range(0, NB, BLOCK_B):
            cols = start + tl.arange(0, BLOCK_B)
            col_ok = cols < NB
            acc = tl.zeros((BLOCK_A, BLOCK_B), tl.float32)
            sq_b = tl.zeros((BLOCK_B,), tl.float32)
            for c0 in range(0, C, BLOCK_C):
                ch = c0 + tl.arange(0, BLOCK_C)
                ch_ok = ch < C
                a = tl.load(base + (2 * rows[:, None]) * s_n + ch[None, :] * s_c,
                            mask=row_ok[:, None] & ch_ok[None, :], other=0.0)
                b = tl.load(base + (2 * cols[:, None] + 1) * s_n + ch[None, :] * s_c,
                            mask=col_ok[:, None] & ch_ok[None, :], other=0.0)
                bf = b.to(tl.float32)
                sq_b += tl.sum(bf * bf, axis=1)
                # Half-precision inputs multiply exactly into the fp32 accumulator on tensor
                # cores; fp32 inputs keep fp32 products (TF32 would reorder near-tied matches).
                if IEEE:
                    acc += tl.dot(a, tl.trans(b), input_precision="ieee")
                else:
                    acc += tl.dot(a, tl.trans(b))
            acc = acc * inv_a[:, None] * (1.0 / tl.sqrt(tl.where(col_ok, sq_b, 1.0)))[None, :]
            # Invalid columns lose to everything; protected rows and columns score -inf (an
            # all-protected row keeps index 0, as torch.max over -inf does).
            acc = tl.where(col_ok[None, :], acc, float("-inf"))
            acc = tl.where((rows[:, None] < PA) | (cols[None, :] < PB), float("-inf"), acc)
            tile_max = tl.max(acc, axis=1)
            is_max = (acc == tile_max[:, None]) & col_ok[None, :]
            tile_idx = tl.min(tl.where(is_max, cols[None, :], NB), axis=1)  # first maximum
            better = tile_max > best
            best_idx = tl.where(better, tile_idx, best_idx)
            best = tl.where(better, tile_max, best)
        tl.store(max_ptr + batch * NA + rows, best, mask=row_ok)
        tl.store(idx_ptr + batch * NA + rows, best_idx, mask=row_ok)

    @triton.jit
    def _select_kernel(max_ptr, idx_ptr, unm_ptr, src_ptr, dst_ptr, row_out_ptr, NA, R, PA, PB, P,
                       BLOCK: tl.constexpr, SORT_UNM: tl.constexpr):
        # One program per image: rank every A token by its best similarity (descending, ties by
        # position: a stable sort), the top R are the sources; then each A token's output row.
        batch = tl.program_id(0)
        i = tl.arange(0, BLOCK)
        ok = i < NA
        mine = tl.load(max_ptr + batch * NA + i, mask=ok, other=float("-inf"))
        rank = tl.zeros((BLOCK,), tl.int32)
        for j in range(0, NA):
            other = tl.load(max_ptr + batch * NA + j)
            rank += ((other > mine) | ((other == mine) & (j < i))).to(tl.int32)
        merged = (rank < R) & ok
        kept = (~merged) & ok
        if SORT_UNM:
            pos = tl.cumsum(kept.to(tl.int32), axis=0) - 1  # kept tokens in input order
        else:
            pos = rank - R  # kept tokens by descending similarity
        match = tl.load(idx_ptr + batch * NA + i, mask=ok, other=0)
        tl.store(src_ptr + batch * R + rank, i, mask=merged)
        tl.store(dst_ptr + batch * R + rank, match, mask=merged)
        tl.store(unm_ptr + batch * (NA - R) + pos, i, mask=kept)
        # Output rows: protected tokens keep their sequence position; then kept A, then B.
        kept_row = tl.where(pos < PA, 2 * pos, P + pos - PA)
        b_row = tl.where(match < PB, 2 * match + 1, P + (NA - R - PA) + match - PB)
        tl.store(row_out_ptr + batch * NA + i, tl.where(merged, b_row, kept_row), mask=ok)

    @triton.jit
    def _merge_rows_kernel(x_ptr, size_ptr, row_out_ptr, out_ptr, out_size_ptr, N, NA, R, PA, PB, P, NOUT, C,
                           s_xb, s_xn, s_xc, HAS_SIZE: tl.constexpr, BLOCK_C: tl.constexpr):
        # One program per input token: its size-weighted row added into its output row.
        batch = tl.program_id(0)
        t = tl.program_id(1)
        j = t // 2
        if t % 2 == 0:
            dest = tl.load(row_out_ptr + batch * NA + j)
        else:
            dest = tl.where(j < PB, 2 * j + 1, P + (NA - R - PA) + j - PB)
        if HAS_SIZE:
            s = tl.load(size_ptr + batch * N + t).to(tl.float32)
        else:
            s = 1.0
        for c0 in range(0, C, BLOCK_C):
            ch = c0 + tl.arange(0, BLOCK_C)
            ok = ch < C
            val = tl.load(x_ptr + batch * s_xb + t * s_xn + ch * s_xc, mask=ok, other=0.0).to(tl.float32)
            tl.atomic_add(out_ptr + (batch * NOUT + dest) * C + ch, val * s, mask=ok)
        tl.atomic_add(out_size_ptr + batch * NOUT + dest, s)


def best_match_triton(metric: torch.Tensor, protected: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``best_match_ref`` without the score matrix: (B, |A|) best cosine similarity (rounded to
    the metric's dtype, as the reference's scores are) and B position."""
    batch, n, c = metric.shape
    na, nb = (n + 1) // 2, n // 2
    pa, pb = _prefix_split(protected)
    node_max = torch.empty(batch, na, device=metric.device, dtype=torch.float32)
    node_idx = torch.empty(batch, na, device=metric.device, dtype=torch.int32)
    block_c = max(16, min(64, triton.next_power_of_2(c)))  # tl.dot needs every dim >= 16
    grid = (batch, triton.cdiv(na, 32))
    _best_match_kernel[grid](metric, node_max, node_idx, na, nb, c, pa, pb, *metric.stride(),
                             BLOCK_A=32, BLOCK_B=64, BLOCK_C=block_c, IEEE=metric.dtype == torch.float32)
    return node_max.to(metric.dtype), node_idx


def token_merge_triton(x: torch.Tensor, size: torch.Tensor | None, metric: torch.Tensor, r: int,
                       protected: int = 0) -> MergeResult:
    if not torch.compiler.is_compiling():
        CALLS["triton"] += 1
    batch, n, c = x.shape
    na = (n + 1) // 2
    pa, pb = _prefix_split(protected)
    node_max, node_idx = best_match_triton(metric, protected)
    dev = x.device
    unm_idx = torch.empty(batch, na - r, device=dev, dtype=torch.int32)
    src_idx = torch.empty(batch, r, device=dev, dtype=torch.int32)
    dst_idx = torch.empty(batch, r, device=dev, dtype=torch.int32)
    row_out = torch.empty(batch, na, device=dev, dtype=torch.int32)
    _select_kernel[(batch,)](node_max.float(), node_idx, unm_idx, src_idx, dst_idx, row_out,
                             na, r, pa, pb, protected, BLOCK=triton.next_power_of_2(na),
                             SORT_UNM=protected > 0)
    nout = n - r
    total = torch.zeros(batch, nout, c, device=dev, dtype=torch.float32)
    merged_size = torch.zeros(batch, nout, 1, device=dev, dtype=torch.float32)
    sizes = size.reshape(batch, n).contiguous() if size is not None else total  # unused when None
    _merge_rows_kernel[(batch, n)](x, sizes, row_out, total, merged_size, n, na, r, pa, pb, protected, nout, c,
                                   *x.stride(), HAS_SIZE=size is not None,
                                   BLOCK_C=min(1024, triton.next_power_of_2(c)))
    out_size = merged_size.to(size.dtype if size is not None else torch.float32)
    return MergeResult((total / merged_size).to(x.dtype), out_size, unm_idx.long(), src_idx.long(),
                       dst_idx.long())


def token_merge(x: torch.Tensor, size: torch.Tensor | None, metric: torch.Tensor, r: int,
                protected: int = 0, kernel: bool | None = None) -> MergeResult:
    """Merge ``r`` tokens of ``x`` (B, N, C) with sizes (B, N, 1) (None: all 1) by ToMe's matching
    on ``metric`` (B, N, Cm), the first ``protected`` tokens never merged. ``kernel``: True for the
    Triton kernels, False for torch, None to decide by the device (:func:`use_triton`)."""
    if not 0 <= r <= max_r(x.shape[1], protected):
        raise ValueError(f"r={r} must be between 0 and half the {x.shape[1] - protected} unprotected tokens")
    if kernel is None:
        kernel = triton is not None and use_triton(x, metric)
    if kernel and r > 0:
        return token_merge_triton(x, size, metric, r, protected)
    return token_merge_ref(x, size, metric, r, protected)


def bench_cases(device: str):
    """ToMe's merge step at the shapes of a ViT-B/16 at 224 px (197 tokens with [CLS], 768
    channels, r=13; the metric is the keys averaged over heads, 64 channels) and a ViT-L/16 at
    384 px (577, 1024, r=8, metric 64), batch 64 and 256, in fp16 as ToMe's throughput runs are."""
    cases = []
    for model, n, c, r in [("vit-b16", 197, 768, 13), ("vit-l16@384", 577, 1024, 8)]:
        for batch in (64, 256):
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(batch, n, c, device=device, generator=g, dtype=torch.float16)
            metric = torch.randn(batch, n, 64, device=device, generator=g, dtype=torch.float16)
            size = torch.randint(1, 4, (batch, n, 1), device=device, generator=g).to(torch.float16)
            label = f"{model} B{batch} N{n} C{c} r{r} fp16"
            cases.append((label, lambda x=x, s=size, m=metric, r=r: token_merge_triton(x, s, m, r, 1)[:2],
                          lambda x=x, s=size, m=metric, r=r: token_merge_ref(x, s, m, r, 1)[:2]))
    return cases
