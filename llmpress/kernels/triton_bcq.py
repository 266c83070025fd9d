"""Triton lookup-table GEMV for binary-coded weights (``layers/bcq_linear.py``), 1-8 rows.

Two kernels, the torch oracle being ``kernels/lut.py``:
- ``_lut_build``: per row and group of 8 inputs, the 256 signed sums ``Σ_t ±x_{8g+t}``;
- ``_lut_gemv``: per block of outputs and slice of the input words, for every bit-plane, each
  packed sign word is loaded once and its four pattern bytes index the table of four groups; the
  entry is scaled by the group's ``α`` (``GROUPS_PER_BLOCK``, the scale block in groups of 8
  columns, is a compile-time constant) and summed. ``SPLIT_K`` slices add into the fp32 output with
  atomics (one slice stores). Autotuned per shape on CUDA; an explicit configuration elsewhere.
The scales are sums of powers of two; the kernel takes them decoded to fp32 (one multiply, the
same value as the shifts and adds). Accumulation in fp32. On CPU the kernels run under
``TRITON_INTERPRET=1``, which is how the tests check them.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:   # optional: BCQLinear falls back to the torch LUT
    triton = None

from ..formats.bcq import apot_value

MAX_ROWS = 8


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _lut_build(x_ptr, lut_ptr, K, G, x_stride):
        m = tl.program_id(0)
        g = tl.program_id(1)
        t = tl.arange(0, 8)
        cols = g * 8 + t
        x = tl.load(x_ptr + m * x_stride + cols, mask=cols < K, other=0.0).to(tl.float32)
        p = tl.arange(0, 256)
        sign = ((p[:, None] >> t[None, :]) & 1).to(tl.float32) * 2.0 - 1.0
        sums = tl.sum(sign * x[None, :], axis=1)
        tl.store(lut_ptr + (m * G + g) * 256 + p, sums)

    @triton.jit
    def _lut_gemv(lut_ptr, bits_ptr, alpha_ptr, y_ptr, M, N, G, n_words, rows_per, n_blocks, n_row_groups,
                  Q: tl.constexpr, GROUPS_PER_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  SPLIT_K: tl.constexpr):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        mask_n = offs_n < N
        mask = (offs_m[:, None] < M) & mask_n[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        row_group = offs_n // rows_per
        per_split = tl.cdiv(n_words, SPLIT_K)
        first = tl.program_id(1) * per_split
        for word in range(first, tl.minimum(first + per_split, n_words)):
            for plane in tl.static_range(Q):
                w = tl.load(bits_ptr + (plane * N + offs_n) * n_words + word, mask=mask_n, other=0)
                w = w.to(tl.uint32, bitcast=True)
                scales = alpha_ptr + (plane * n_row_groups + row_group) * n_blocks
                for j in tl.static_range(4):   # the word's four groups of 8 columns
                    g = word * 4 + j
                    valid_n = mask_n & (offs_n * 0 + g < G)   # the last word may hold fewer groups
                    pattern = ((w >> (8 * j)) & 255).to(tl.int32)
                    alpha = tl.load(scales + g // GROUPS_PER_BLOCK, mask=valid_n, other=0.0)
                    val = tl.load(lut_ptr + (offs_m[:, None] * G + g) * 256 + pattern[None, :],
                                  mask=(offs_m[:, None] < M) & valid_n[None, :], other=0.0)
                    acc += val * alpha[None, :]
        out = y_ptr + offs_m[:, None] * N + offs_n[None, :]
        if SPLIT_K == 1:
            tl.store(out, acc, mask=mask)
        else:
            tl.atomic_add(out, acc, mask=mask)

    _lut_gemv_tuned = triton.autotune(
        [triton.Config({"BLOCK_N": bn, "SPLIT_K": sk}, num_warps=4) for bn in (32, 64, 128) for sk in (1, 2, 4, 8)],
        key=["M", "N", "G"], reset_to_zero=["y_ptr"])(_lut_gemv)


def bcq_gemv(layer, x: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """``x [M ≤ 8, K] → [M, N]`` of a ``BCQLinear`` (fp32 accumulation, returned in ``x``'s dtype, no bias)."""
    alpha = apot_value(layer.alpha_exp, layer.alpha_sign).to(torch.float32)
    return scaled_gemv(x, layer.sign_bits, alpha, layer.col_block, layer.out_features, config)


def scaled_gemv(x: torch.Tensor, sign_bits: torch.Tensor, alpha: torch.Tensor, col_block: int, out_features: int,
                config: dict | None = None) -> torch.Tensor:
    """``x [M ≤ 8, K] → [M, N]`` for sign planes ``[q, N, ceil(K/32)]`` and float scales
    ``alpha [q, R, C]`` (one per ``N/R`` rows × ``col_block`` columns): the same contract as
    ``kernels.lut.lut_gemv_scaled``. ``config`` (``BLOCK_N``, ``SPLIT_K``) instead of the autotuned
    choice."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    m, k = x.shape
    if m > MAX_ROWS:
        raise ValueError(f"the LUT GEMV takes at most {MAX_ROWS} rows, got {m}")
    if col_block % 8:
        raise ValueError(f"the LUT GEMV needs scale blocks of a multiple of 8 columns, got {col_block}")
    n, q = out_features, sign_bits.shape[0]
    row_groups = alpha.shape[1]
    groups = -(-k // 8)
    x = x.contiguous()
    lut = torch.empty(m, groups, 256, dtype=torch.float32, device=x.device)
    _lut_build[(m, groups)](x, lut, k, groups, x.stride(0))
    alpha = alpha.to(torch.float32).to(x.device).contiguous()
    y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    bits = sign_bits.contiguous()
    args = (lut, bits, alpha, y, m, n, groups, bits.shape[2], n // row_groups, alpha.shape[2], row_groups)
    flags = {"Q": q, "GROUPS_PER_BLOCK": col_block // 8, "BLOCK_M": MAX_ROWS}
    if config is None and x.is_cuda:
        _lut_gemv_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])](*args, **flags)
    else:
        config = {"BLOCK_N": 64, "SPLIT_K": 2, **(config or {})}
        _lut_gemv[(triton.cdiv(n, config["BLOCK_N"]), config["SPLIT_K"])](*args, **flags, **config)
    return y.to(x.dtype)
