"""The lookup-table GEMV of binary-coded weights, in torch (the oracle of the Triton kernel).

For every group of 8 consecutive inputs the 256 signed sums ``LUT[p] = Σ_t ±x_{8g+t}`` (sign +
where bit ``t`` of ``p`` is set) are built once per token; each output then adds, per bit-plane
and group, ``α · LUT[pattern]`` where ``pattern`` is the byte of that row's sign bits. With ``α`` a
sum of signed powers of two the multiply is shifts and adds: no weight is ever dequantized.
"""

from __future__ import annotations

import torch

from ..formats.bcq import apot_value

_PATTERN_SIGNS = torch.tensor([[1.0 if (p >> t) & 1 else -1.0 for t in range(8)] for p in range(256)])


def build_luts(x: torch.Tensor) -> torch.Tensor:
    """``[B, K/8, 256]`` signed sums of each group of 8 inputs of ``x [B, K]`` (K padded to 8)."""
    b, k = x.shape
    pad = (-k) % 8
    groups = torch.nn.functional.pad(x, (0, pad)).reshape(b, -1, 8)
    return groups @ _PATTERN_SIGNS.to(x.dtype).T


def lut_gemv(x: torch.Tensor, sign_bits: torch.Tensor, alpha_exp: torch.Tensor, alpha_sign: torch.Tensor,
             col_block: int, out_features: int) -> torch.Tensor:
    """``x [B, K] → [B, N]`` through the LUTs; ``sign_bits`` int32 ``[q, N, ceil(K/32)]``, the
    scales in APoT form ``[q, R, C, terms]``."""
    return lut_gemv_scaled(x, sign_bits, apot_value(alpha_exp, alpha_sign).to(x.dtype), col_block, out_features)


def lut_gemv_scaled(x: torch.Tensor, sign_bits: torch.Tensor, alpha: torch.Tensor, col_block: int,
                    out_features: int) -> torch.Tensor:
    """The same with float scales ``alpha [q, R, C]``: one per ``N/R`` rows × ``col_block`` columns."""
    q = sign_bits.shape[0]
    luts = build_luts(x)                                          # [B, G, 256]
    n_groups = luts.shape[1]
    words = sign_bits.to(torch.int64) & 0xFFFFFFFF                # [q, N, W]
    g = torch.arange(n_groups)
    patterns = (words[:, :, (g * 8) // 32] >> ((g * 8) % 32)) & 0xFF          # [q, N, G]
    alpha = alpha.to(x.dtype)                                     # [q, R, C]
    if col_block % 8:
        raise ValueError(f"the LUT path needs scale blocks of a multiple of 8 columns, got {col_block}")
    rows_per = out_features // alpha.shape[1]
    alpha_g = alpha.repeat_interleave(rows_per, 1).repeat_interleave(col_block // 8, 2)[:, :, :n_groups]
    y = torch.zeros(x.shape[0], out_features, dtype=x.dtype)
    for plane in range(q):
        picked = torch.gather(luts.unsqueeze(1).expand(-1, out_features, -1, -1), 3,
                              patterns[plane].unsqueeze(0).unsqueeze(-1).expand(x.shape[0], -1, -1, 1)).squeeze(-1)
        y += (picked * alpha_g[plane].unsqueeze(0)).sum(-1)
    return y
