"""Torch reference dequantization of the uniform packed format: the oracle for other kernels."""

from __future__ import annotations

import torch

from .packing import unpack_codes


def dequantize_uniform(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor | None,
    *,
    bits: int,
    in_features: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense ``[out, in]`` weights from packed codes, fp16 group scales and packed zeros.

    ``g_idx[c]`` names the group of input column ``c``; without it the group is ``c // group_size``
    (``0`` for per-row grids).
    """
    codes = unpack_codes(qweight, bits, in_features)
    n_groups = scales.shape[1]
    zeros = unpack_codes(qzeros, bits, n_groups)
    if g_idx is None:
        if n_groups == 1:
            cols = torch.zeros(in_features, dtype=torch.int64, device=qweight.device)
        else:
            cols = torch.arange(in_features, device=qweight.device) // group_size
    else:
        cols = g_idx.to(torch.int64)
    s = scales.to(torch.float32)[:, cols]
    z = zeros[:, cols]
    return (s * (codes - z).to(torch.float32)).to(dtype)
