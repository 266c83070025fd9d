"""Triton kernels for the uniform packed format (``layers/quant_linear.py``): 2, 3, 4 and 8 bits,
any group size (per-row included, ragged last group included), asymmetric zeros, act-order
``g_idx``.

- ``dequantize``: the dense ``[N, K]`` weight, tile by tile.
- ``matmul``: fused dequantize-GEMM for prefill: each program dequantizes a ``BLOCK_N × BLOCK_K``
  tile of ``W`` in registers and feeds it to ``tl.dot`` with the matching tile of ``x``.
- ``gemv``: split-K GEMV for decoding (1-8 rows): the K range is cut into ``SPLIT_K`` slices, each
  program reduces its slice for every row into a ``[SPLIT_K, M, N]`` fp32 workspace, and the
  slices are summed afterwards (no atomics: the result is deterministic).

Code ``k`` of row ``n`` sits at bit ``k·b`` of the row's little-endian bitstream; a 3-bit code may
straddle two words, so every extraction reads the word and its successor. All kernels accumulate
in fp32. On CPU they run under ``TRITON_INTERPRET=1`` (set before this module is imported), which
is how the tests check them against the torch reference.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:   # an optional dependency: the dispatcher falls back to the reference
    triton = None


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _codes(packed_ptr, row_stride, rows, cols, n_words, BITS: tl.constexpr):
        """Codes at ``[rows[:, None], cols[None, :]]`` of a packed matrix (int32 words per row)."""
        bit = cols * BITS
        word = bit // 32
        shift = (bit % 32).to(tl.uint32)
        base = packed_ptr + rows[:, None] * row_stride
        lo = tl.load(base + word[None, :], mask=word[None, :] < n_words, other=0).to(tl.uint32, bitcast=True)
        hi = tl.load(base + word[None, :] + 1, mask=word[None, :] + 1 < n_words, other=0).to(tl.uint32, bitcast=True)
        value = lo >> shift[None, :]
        # the bits that spill into the next word (only when shift + BITS > 32)
        spill = tl.where(shift[None, :] > 32 - BITS, hi << ((32 - shift[None, :]) % 32), 0)
        return ((value | spill) & ((1 << BITS) - 1)).to(tl.int32)

    @triton.jit
    def _weight_tile(qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, offs_n, offs_k, N, K,
                     qw_stride, s_stride, qz_stride, n_words, nz_words, group_size,
                     BITS: tl.constexpr, HAS_G_IDX: tl.constexpr, PER_ROW: tl.constexpr):
        """The fp32 weights ``W[offs_n, offs_k]`` (zero outside the matrix)."""
        mask_n = offs_n < N
        mask_k = offs_k < K
        codes = _codes(qweight_ptr, qw_stride, offs_n, offs_k, n_words, BITS)
        if HAS_G_IDX:
            group = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
        elif PER_ROW:
            group = offs_k * 0
        else:
            group = offs_k // group_size
        zeros = _codes(qzeros_ptr, qz_stride, offs_n, group, nz_words, BITS)
        mask = mask_n[:, None] & mask_k[None, :]
        scales = tl.load(scales_ptr + offs_n[:, None] * s_stride + group[None, :], mask=mask, other=0.0)
        return tl.where(mask, scales.to(tl.float32) * (codes - zeros).to(tl.float32), 0.0)

    @triton.jit
    def _dequantize_kernel(out_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, N, K,
                           qw_stride, s_stride, qz_stride, n_words, nz_words, group_size,
                           BITS: tl.constexpr, HAS_G_IDX: tl.constexpr, PER_ROW: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        w = _weight_tile(qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, offs_n, offs_k, N, K,
                         qw_stride, s_stride, qz_stride, n_words, nz_words, group_size,
                         BITS, HAS_G_IDX, PER_ROW)
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _matmul_kernel(y_ptr, x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, M, N, K,
                       x_stride, qw_stride, s_stride, qz_stride, n_words, nz_words, group_size,
                       BITS: tl.constexpr, HAS_G_IDX: tl.constexpr, PER_ROW: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * x_stride + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
            w = _weight_tile(qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, offs_n, offs_k, N, K,
                             qw_stride, s_stride, qz_stride, n_words, nz_words, group_size,
                             BITS, HAS_G_IDX, PER_ROW)
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gemv_kernel(partial_ptr, x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, M, N, K,
                     x_stride, qw_stride, s_stride, qz_stride, n_words, nz_words, group_size, k_per_split,
                     p_stride_split, p_stride_m,
                     BITS: tl.constexpr, HAS_G_IDX: tl.constexpr, PER_ROW: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        split = tl.program_id(1)
        k_start = split * k_per_split
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            in_slice = (offs_k < k_start + k_per_split) & (offs_k < K)
            # each weight tile is dequantized once and used for every row
            w = _weight_tile(qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, offs_n, offs_k, N, K,
                             qw_stride, s_stride, qz_stride, n_words, nz_words, group_size,
                             BITS, HAS_G_IDX, PER_ROW)
            x = tl.load(x_ptr + offs_m[:, None] * x_stride + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & in_slice[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(partial_ptr + split * p_stride_split + offs_m[:, None] * p_stride_m + offs_n[None, :], acc, mask=mask)


def _layer_args(layer) -> tuple:
    n_words = layer.qweight.shape[1]
    nz_words = layer.qzeros.shape[1]
    g_idx = layer.g_idx if layer.g_idx is not None else layer.qweight   # unused pointer when absent
    return (layer.qweight, layer.scales, layer.qzeros, g_idx), (n_words, nz_words, max(layer.group_size, 1))


def _flags(layer) -> dict:
    return {"BITS": layer.bits, "HAS_G_IDX": layer.g_idx is not None, "PER_ROW": layer.n_groups == 1}


def dequantize(layer, dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None,
               block_n: int = 32, block_k: int = 64) -> torch.Tensor:
    N, K = layer.out_features, layer.in_features
    out = torch.empty(N, K, dtype=dtype, device=layer.qweight.device) if out is None else out
    tensors, (n_words, nz_words, group) = _layer_args(layer)
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    _dequantize_kernel[grid](out, *tensors, N, K, layer.qweight.stride(0), layer.scales.stride(0),
                             layer.qzeros.stride(0), n_words, nz_words, group, **_flags(layer),
                             BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def matmul(layer, x: torch.Tensor, out: torch.Tensor | None = None,
           block_m: int = 16, block_n: int = 32, block_k: int = 32) -> torch.Tensor:
    """``x [M, K] · Wᵀ`` with the dequantization fused into the GEMM (no bias)."""
    M, K = x.shape
    N = layer.out_features
    x = x.contiguous()
    out = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    tensors, (n_words, nz_words, group) = _layer_args(layer)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _matmul_kernel[grid](out, x, *tensors, M, N, K, x.stride(0), layer.qweight.stride(0), layer.scales.stride(0),
                         layer.qzeros.stride(0), n_words, nz_words, group, **_flags(layer),
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def gemv(layer, x: torch.Tensor, split_k: int = 4, workspace: torch.Tensor | None = None,
         block_n: int = 32) -> torch.Tensor:
    """``x [M ≤ 8, K] · Wᵀ`` by split-K: fp32 partial sums per K slice, summed at the end."""
    M, K = x.shape
    if M > 8:
        raise ValueError(f"gemv takes at most 8 rows, got {M}")
    N = layer.out_features
    x = x.contiguous()
    block_m = 1 if M == 1 else (2 if M == 2 else (4 if M <= 4 else 8))
    block_k = 128 // block_m          # bounds the [rows, BLOCK_N, BLOCK_K] product held in registers
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    if workspace is None:
        workspace = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device)
    elif workspace.shape[0] < split_k or workspace.shape[1] < M or workspace.shape[2] != N or workspace.stride(2) != 1:
        raise ValueError(f"the workspace must be fp32 [>= {split_k}, >= {M}, {N}], got {tuple(workspace.shape)}")
    tensors, (n_words, nz_words, group) = _layer_args(layer)
    grid = (triton.cdiv(N, block_n), split_k)
    _gemv_kernel[grid](workspace, x, *tensors, M, N, K, x.stride(0), layer.qweight.stride(0), layer.scales.stride(0),
                       layer.qzeros.stride(0), n_words, nz_words, group, k_per_split,
                       workspace.stride(0), workspace.stride(1), **_flags(layer),
                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return workspace[:split_k, :M].sum(dim=0).to(x.dtype)


def uniform_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """The dispatcher's Triton path: GEMV for up to 8 rows, the fused GEMM beyond."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    y = gemv(layer, flat) if flat.shape[0] <= 8 else matmul(layer, flat)
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y.reshape(*lead, layer.out_features)
