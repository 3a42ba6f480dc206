"""Nearest codebook entry for each row of a batch: ``argmin_j ||x_i - c_j||^2``.

The hot path of every vector quantiser (VQ, each stage of residual VQ). The distance is expanded
as ``||c_j||^2 - 2 x_i . c_j`` (``||x_i||^2`` is the same for every j, so it cannot change the
argmin), which turns the search into one matrix product plus a running minimum over codebook
tiles: the full (N, K) distance matrix is never written to memory.
"""

from __future__ import annotations

import torch

from tokctl.kernels import use_triton

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - no Triton: the reference serves every call
    triton = None


def nearest_code_ref(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) rows, (K, D) codes -> (index (N,) int64, squared distance (N,) fp32)."""
    x32, c32 = x.float(), codebook.float()
    dist = (c32 * c32).sum(1)[None, :] - 2.0 * x32 @ c32.t()
    best, index = dist.min(dim=1)
    return index, best + (x32 * x32).sum(1)


if triton is not None:

    @triton.jit
    def _nearest_code_kernel(x_ptr, c_ptr, index_ptr, dist_ptr, N, K, D,
                             stride_xn, stride_xd, stride_ck, stride_cd,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                             IEEE: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        best = tl.full((BLOCK_N,), float("inf"), tl.float32)
        best_index = tl.zeros((BLOCK_N,), tl.int64)
        x_norm = tl.zeros((BLOCK_N,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            codes = k0 + tl.arange(0, BLOCK_K)
            code_ok = codes < K
            dot = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
            c_norm = tl.zeros((BLOCK_K,), tl.float32)
            x_norm_tile = tl.zeros((BLOCK_N,), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                dim_ok = dims < D
                xt = tl.load(x_ptr + rows[:, None] * stride_xn + dims[None, :] * stride_xd,
                             mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
                ct = tl.load(c_ptr + codes[:, None] * stride_ck + dims[None, :] * stride_cd,
                             mask=code_ok[:, None] & dim_ok[None, :], other=0.0)
                # Tensor cores; fp32 inputs keep full fp32 products (TF32 would flip near-tied
                # argmins that the reference resolves), half-precision ones multiply exactly in fp32.
                if IEEE:
                    dot += tl.dot(xt, tl.trans(ct), input_precision="ieee")
                else:
                    dot += tl.dot(xt, tl.trans(ct))
                cf = ct.to(tl.float32)
                xf = xt.to(tl.float32)
                c_norm += tl.sum(cf * cf, axis=1)
                x_norm_tile += tl.sum(xf * xf, axis=1)
            x_norm = x_norm_tile
            dist = c_norm[None, :] - 2.0 * dot
            dist = tl.where(code_ok[None, :], dist, float("inf"))
            tile_best = tl.min(dist, axis=1)
            tile_index = tl.argmin(dist, axis=1).to(tl.int64) + k0
            # strictly better only: ties keep the lowest index, as torch's argmin does
            better = tile_best < best
            best_index = tl.where(better, tile_index, best_index)
            best = tl.where(better, tile_best, best)
        tl.store(index_ptr + rows, best_index, mask=row_ok)
        tl.store(dist_ptr + rows, best + x_norm, mask=row_ok)


def nearest_code_triton(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = x.shape
    k = codebook.shape[0]
    if codebook.dtype != x.dtype:
        codebook = codebook.to(x.dtype)
    index = torch.empty(n, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, dtype=torch.float32, device=x.device)
    block_d = max(16, min(64, triton.next_power_of_2(max(d, 1))))  # tl.dot needs every dim >= 16
    block_n, block_k = 64, 64
    grid = (triton.cdiv(n, block_n),)
    _nearest_code_kernel[grid](x, codebook, index, dist, n, k, d,
                               x.stride(0), x.stride(1), codebook.stride(0), codebook.stride(1),
                               BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d,
                               IEEE=x.dtype == torch.float32)
    return index, dist


def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest code for each row of ``x`` and its squared distance (no gradient)."""
    if x.dim() != 2 or codebook.dim() != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(f"nearest_code needs (N, D) rows and (K, D) codes, got "
                         f"{tuple(x.shape)} and {tuple(codebook.shape)}")
    with torch.no_grad():
        if triton is not None and use_triton(x, codebook) and x.shape[0] > 0:
            return nearest_code_triton(x.detach(), codebook.detach())
        return nearest_code_ref(x.detach(), codebook.detach())


def bench_cases(device: str):
    """Codebook searches of the image tokenizers: TiTok-like (4096 codes of 12 dims, 32 images x
    256 latents) and a VQGAN-like 2D grid (16384 codes of 256 dims, 8 images x 1024 latents)."""
    cases = []
    for label, n, k, d, dtype in [("titok N8192 K4096 D12 fp32", 32 * 256, 4096, 12, torch.float32),
                                  ("vqgan N8192 K16384 D256 fp32", 8 * 1024, 16384, 256, torch.float32),
                                  ("vqgan N8192 K16384 D256 bf16", 8 * 1024, 16384, 256, torch.bfloat16)]:
        g = torch.Generator(device=device).manual_seed(0)
        codebook = torch.randn(k, d, device=device, generator=g, dtype=dtype)
        x = torch.randn(n, d, device=device, generator=g, dtype=dtype)
        cases.append((label, lambda x=x, c=codebook: nearest_code_triton(x, c),
                      lambda x=x, c=codebook: nearest_code_ref(x, c)))
    return cases
