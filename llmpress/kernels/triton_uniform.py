"""Triton kernels for the uniform packed format (``layers/quant_linear.py``): 2, 3, 4 and 8 bits,
asymmetric zeros, per-row grids and groups of 16 or more columns (a power of two; the last group may
be ragged), act-order ``g_idx``.

- ``dequantize``: the dense ``[N, K]`` weight, tile by tile, for any ``g_idx``.
- ``gemv`` (decoding, 1-8 rows): each program takes ``BLOCK_N`` output rows and a slice of K. The
  group size is a compile-time constant and a K tile never crosses a group, so a group's scales
  and zero codes are loaded once per tile for all its rows; the codes come from whole int32 words
  (2/4/8 bits: one vector load and shifts; 3 bits straddle words and take the per-code extraction);
  per group ``s·(Σ x·c − z·Σ x)`` saves the per-weight subtraction and product. ``SPLIT_K`` slices
  add into an fp32 output with atomics (one slice stores), so there is no second reduction pass;
  the order of those additions varies between runs (fp32 rounding, not determinism, differs).
- ``matmul`` (prefill): each tile is dequantized in registers to the activations' dtype and fed to
  ``tl.dot``: tensor cores for fp16/bf16, IEEE fp32 for fp32 inputs; scales and zeros once per tile.
  ``prefill`` picks between it and dequantizing once into a reused scratch buffer for cuBLAS.
- On CUDA both GEMM kernels are autotuned per shape (``triton.autotune``); elsewhere (the CPU
  interpreter, the tests) they run with an explicit configuration.

Code ``k`` of row ``n`` sits at bit ``k·b`` of the row's little-endian bitstream. The GEMV and the
GEMM read groups as contiguous runs of columns: an act-order layer whose groups are permuted runs
of equal size (GPTQ's) is repacked once in group order (``sorted_layout``, cached on the layer) and
each call gathers ``x`` into that order once, instead of gathering a group index per weight. A
layer these kernels cannot read (other group sizes, irregular ``g_idx``) is dequantized and
multiplied. All kernels accumulate in fp32. On CPU they run under ``TRITON_INTERPRET=1`` (set
before this module is imported), which is how the tests check them against the torch reference.
"""

from __future__ import annotations

import torch

from ..formats.packing import pack_codes, unpack_codes

try:
    import triton
    import triton.language as tl
except ImportError:   # an optional dependency: the dispatcher falls back to the reference
    triton = None

GEMV_MAX_ROWS = 8
# From this many rows the prefill dequantizes once into a scratch buffer and calls cuBLAS; below,
# the fused kernel. Not measured yet on a GPU (bench/gpu_check.py's kernel table has both columns):
# set it from that table.
PREFILL_CUBLAS_FROM = 256


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _codes(packed_ptr, row_stride, rows, cols, n_words, BITS: tl.constexpr):
        """Codes at ``[rows[:, None], cols[None, :]]`` of a packed matrix (int32 words per row), any
        column set: every extraction reads the word and its successor (3-bit codes straddle)."""
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
    def _code_tile(packed_ptr, row_stride, offs_n, k0, n_words, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
        """Codes ``[offs_n, k0 : k0 + BLOCK_K]`` as fp32: whole words loaded as a vector and shifted
        apart where codes do not straddle words (2, 4, 8 bits; ``k0`` a multiple of ``BLOCK_K``)."""
        if 32 % BITS == 0:
            PER: tl.constexpr = 32 // BITS
            WORDS: tl.constexpr = BLOCK_K // PER
            offs_w = k0 // PER + tl.arange(0, WORDS)
            words = tl.load(packed_ptr + offs_n[:, None] * row_stride + offs_w[None, :],
                            mask=offs_w[None, :] < n_words, other=0).to(tl.uint32, bitcast=True)
            shifts = (tl.arange(0, PER) * BITS).to(tl.uint32)
            codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
            return tl.reshape(codes, (offs_n.shape[0], BLOCK_K)).to(tl.float32)
        else:
            return _codes(packed_ptr, row_stride, offs_n, k0 + tl.arange(0, BLOCK_K), n_words, BITS).to(tl.float32)

    @triton.jit
    def _group_grid(scales_ptr, qzeros_ptr, offs_n, mask_n, group, s_stride, qz_stride, nz_words,
                    BITS: tl.constexpr):
        """The scales and zero codes ``[offs_n]`` of one group, as fp32."""
        scale = tl.load(scales_ptr + offs_n * s_stride + group, mask=mask_n, other=0.0).to(tl.float32)
        cols = group + tl.arange(0, 1)
        zero = _codes(qzeros_ptr, qz_stride, offs_n, cols, nz_words, BITS)
        return scale, tl.reshape(zero, (offs_n.shape[0],)).to(tl.float32)

    @triton.jit
    def _weight_tile(qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, offs_n, offs_k, N, K,
                     qw_stride, s_stride, qz_stride, n_words, nz_words, group_size,
                     BITS: tl.constexpr, HAS_G_IDX: tl.constexpr, PER_ROW: tl.constexpr):
        """The fp32 weights ``W[offs_n, offs_k]`` for any ``g_idx`` (zero outside the matrix)."""
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
    def _gemv_kernel(y_ptr, x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, M, N, K,
                     x_stride, qw_stride, s_stride, qz_stride, n_words, nz_words,
                     BITS: tl.constexpr, GROUP: tl.constexpr, PER_ROW: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_m = tl.arange(0, BLOCK_M)
        # a slice is whole tiles, and a tile lies within one group (BLOCK_K divides GROUP)
        k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_start = tl.program_id(1) * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if PER_ROW:
            scale, zero = _group_grid(scales_ptr, qzeros_ptr, offs_n, mask_n, 0, s_stride, qz_stride, nz_words, BITS)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * x_stride + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_end), other=0.0).to(tl.float32)
            codes = _code_tile(qweight_ptr, qw_stride, offs_n, k0, n_words, BITS, BLOCK_K)
            dot = tl.sum(x[:, None, :] * codes[None, :, :], axis=2)   # Σ x·c per row and output
            x_sum = tl.sum(x, axis=1)
            if PER_ROW:
                acc += dot - x_sum[:, None] * zero[None, :]
            else:
                scale, zero = _group_grid(scales_ptr, qzeros_ptr, offs_n, mask_n, k0 // GROUP, s_stride, qz_stride,
                                          nz_words, BITS)
                acc += scale[None, :] * (dot - x_sum[:, None] * zero[None, :])
        if PER_ROW:
            acc = acc * scale[None, :]
        out = y_ptr + offs_m[:, None] * N + offs_n[None, :]
        mask = (offs_m[:, None] < M) & mask_n[None, :]
        if SPLIT_K == 1:
            tl.store(out, acc, mask=mask)
        else:
            tl.atomic_add(out, acc, mask=mask)

    @triton.jit
    def _matmul_kernel(y_ptr, x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, M, N, K, m_bucket,
                       x_stride, qw_stride, s_stride, qz_stride, n_words, nz_words,
                       BITS: tl.constexpr, GROUP: tl.constexpr, PER_ROW: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if PER_ROW:
            scale, zero = _group_grid(scales_ptr, qzeros_ptr, offs_n, mask_n, 0, s_stride, qz_stride, nz_words, BITS)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * x_stride + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            codes = _code_tile(qweight_ptr, qw_stride, offs_n, k0, n_words, BITS, BLOCK_K)
            if not PER_ROW:
                scale, zero = _group_grid(scales_ptr, qzeros_ptr, offs_n, mask_n, k0 // GROUP, s_stride, qz_stride,
                                          nz_words, BITS)
            w = ((codes - zero[:, None]) * scale[:, None]).to(x.dtype)
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:   # fp16/bf16 operands: tensor cores, fp32 accumulation
                acc += tl.dot(x, tl.trans(w))
        mask = (offs_m[:, None] < M) & mask_n[None, :]
        tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)

    GEMV_CONFIGS = [triton.Config({"BLOCK_N": bn, "SPLIT_K": sk}, num_warps=w)
                    for bn in (32, 64, 128) for sk in (1, 2, 4, 8) for w in (4,)]
    MATMUL_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w)
                      for bm, bn, s, w in ((16, 64, 4, 4), (32, 64, 4, 4), (64, 64, 3, 4), (64, 128, 3, 4),
                                           (128, 64, 3, 8), (128, 128, 3, 8), (128, 256, 3, 8), (256, 128, 3, 8))]
    _gemv_tuned = triton.autotune(GEMV_CONFIGS, key=["M", "N", "K"], reset_to_zero=["y_ptr"])(_gemv_kernel)
    _matmul_tuned = triton.autotune(MATMUL_CONFIGS, key=["m_bucket", "N", "K"])(_matmul_kernel)


# -- the layout the GEMV and GEMM read ------------------------------------------------------------

def fast_layout(layer) -> bool:
    """Whether the GEMV and GEMM read this layer: a per-row grid, or groups of a power-of-two size of
    at least 16 columns that are contiguous, or permuted runs of that size (GPTQ's act-order)."""
    return sorted_layout(layer) is not None


def _group_order(layer) -> torch.Tensor | None:
    """The columns in group order, where that order makes every group a contiguous run of
    ``group_size`` columns (the last may be shorter); None otherwise."""
    g_idx = layer.g_idx.to(torch.int64)
    order = torch.argsort(g_idx, stable=True)
    expected = torch.arange(layer.in_features, device=g_idx.device) // max(layer.group_size, 1)
    return order if torch.equal(g_idx[order], expected) else None


def sorted_layout(layer) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The packed codes in group order and the column order that ``x`` is gathered in (None: the
    layer is in that order already); None where the kernels cannot read the layer. An act-order
    layer's answer is worked out once and kept on it (its codes are then held twice: the stored
    order serves the other paths), so a call costs no argsort."""
    per_row = layer.n_groups == 1 and layer.g_idx is None
    size = layer.group_size
    if not per_row and (size < 16 or size & (size - 1)):
        return None
    if layer.g_idx is None:
        return layer.qweight, None
    key = (layer.qweight.data_ptr(), layer.qweight._version, layer.g_idx.data_ptr(), layer.g_idx._version)
    cached = getattr(layer, "_triton_sorted", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    order = _group_order(layer)
    layout = None
    if order is not None:
        codes = unpack_codes(layer.qweight, layer.bits, layer.in_features)[:, order]
        layout = (pack_codes(codes, layer.bits).contiguous(), order)
    layer._triton_sorted = (key, layout)
    return layout


def _layout_flags(layer) -> dict:
    per_row = layer.n_groups == 1
    return {"BITS": layer.bits, "GROUP": 0 if per_row else layer.group_size, "PER_ROW": per_row}


def _autotuned(x: torch.Tensor, config: dict | None) -> bool:
    return config is None and x.is_cuda


# -- the calls ------------------------------------------------------------------------------------

def dequantize(layer, dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None,
               block_n: int = 32, block_k: int = 64) -> torch.Tensor:
    """The dense ``[N, K]`` weight in ``dtype`` (into ``out`` where given)."""
    N, K = layer.out_features, layer.in_features
    out = torch.empty(N, K, dtype=dtype, device=layer.qweight.device) if out is None else out
    g_idx = layer.g_idx if layer.g_idx is not None else layer.qweight   # an unused pointer when absent
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    _dequantize_kernel[grid](out, layer.qweight, layer.scales, layer.qzeros, g_idx, N, K, layer.qweight.stride(0),
                             layer.scales.stride(0), layer.qzeros.stride(0), layer.qweight.shape[1],
                             layer.qzeros.shape[1], max(layer.group_size, 1), BITS=layer.bits,
                             HAS_G_IDX=layer.g_idx is not None, PER_ROW=layer.n_groups == 1,
                             BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def _gathered(x: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    return (x if order is None else x.index_select(1, order)).contiguous()


def gemv(layer, x: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """``x [M ≤ 8, K] · Wᵀ`` in ``x``'s dtype (no bias); ``config`` (``BLOCK_N``, ``SPLIT_K``)
    instead of the autotuned choice."""
    M, K = x.shape
    if M > GEMV_MAX_ROWS:
        raise ValueError(f"gemv takes at most {GEMV_MAX_ROWS} rows, got {M}")
    layout = sorted_layout(layer)
    if layout is None:
        raise ValueError("gemv reads per-row grids and power-of-two groups of at least 16 columns")
    N = layer.out_features
    qweight, order = layout
    x = _gathered(x, order)
    flags = _layout_flags(layer)
    block_m = 1 if M == 1 else (2 if M == 2 else (4 if M <= 4 else 8))
    # the [rows, BLOCK_N, BLOCK_K] product is held in registers; a tile never crosses a group
    block_k = max(16, 128 // block_m)
    if not flags["PER_ROW"]:
        block_k = min(block_k, layer.group_size)
    y = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    args = (y, x, qweight, layer.scales, layer.qzeros, M, N, K, x.stride(0), qweight.stride(0), layer.scales.stride(0),
            layer.qzeros.stride(0), qweight.shape[1], layer.qzeros.shape[1])
    if _autotuned(x, config):
        _gemv_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])](
            *args, **flags, BLOCK_M=block_m, BLOCK_K=block_k)
    else:
        config = {"BLOCK_N": 32, "SPLIT_K": 4, **(config or {})}
        _gemv_kernel[(triton.cdiv(N, config["BLOCK_N"]), config["SPLIT_K"])](
            *args, **flags, BLOCK_M=block_m, BLOCK_K=block_k, **config)
    return y.to(x.dtype)


def matmul(layer, x: torch.Tensor, out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """``x [M, K] · Wᵀ`` with the dequantization fused into the GEMM (no bias); ``config``
    (``BLOCK_M``, ``BLOCK_N``) instead of the autotuned choice."""
    layout = sorted_layout(layer)
    if layout is None:
        raise ValueError("matmul reads per-row grids and power-of-two groups of at least 16 columns")
    M, K = x.shape
    N = layer.out_features
    qweight, order = layout
    x = _gathered(x, order)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    flags = _layout_flags(layer)
    block_k = 64 if flags["PER_ROW"] else min(64, layer.group_size)
    args = (out, x, qweight, layer.scales, layer.qzeros, M, N, K, triton.next_power_of_2(M), x.stride(0), qweight.stride(0),
            layer.scales.stride(0), layer.qzeros.stride(0), qweight.shape[1], layer.qzeros.shape[1])
    ieee = x.dtype == torch.float32
    if _autotuned(x, config):
        _matmul_tuned[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))](
            *args, **flags, IEEE=ieee, BLOCK_K=block_k)
    else:
        config = {"BLOCK_M": 16, "BLOCK_N": 32, **(config or {})}
        _matmul_kernel[(triton.cdiv(M, config["BLOCK_M"]), triton.cdiv(N, config["BLOCK_N"]))](
            *args, **flags, IEEE=ieee, BLOCK_K=block_k, **config)
    return out


_scratch: dict[tuple, torch.Tensor] = {}


def dequantized_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    """``x · Wᵀ`` by dequantizing ``W`` into a scratch buffer (one per device and dtype, grown to
    the largest layer, reused by every layer) and one cuBLAS GEMM."""
    key = (x.device, x.dtype)
    size = layer.out_features * layer.in_features
    if key not in _scratch or _scratch[key].numel() < size:
        _scratch[key] = torch.empty(size, dtype=x.dtype, device=x.device)
    weight = dequantize(layer, x.dtype, out=_scratch[key][:size].view(layer.out_features, layer.in_features))
    return x @ weight.T


def uniform_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """The dispatcher's Triton path: the GEMV up to ``GEMV_MAX_ROWS`` rows, the fused GEMM below
    ``PREFILL_CUBLAS_FROM`` rows, dequantize-once and cuBLAS from there (and for any layout the
    kernels do not read)."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    if not fast_layout(layer) or rows >= PREFILL_CUBLAS_FROM:
        y = dequantized_matmul(layer, flat)
    elif rows <= GEMV_MAX_ROWS:
        y = gemv(layer, flat)
    else:
        y = matmul(layer, flat)
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y.reshape(*lead, layer.out_features)
