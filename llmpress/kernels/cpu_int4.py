"""The CPU int4 path: torch's own packed int4 GEMM (``_weight_int4pack_mm_for_cpu``).

torch's kernel computes ``y = x · Wᵀ`` with ``W[n, k] = (q[n, k] − 8)·scale[g, n] + offset[g, n]``
over contiguous groups of ``g ∈ {32, 64, 128, 256}`` input columns. The uniform format maps onto it
exactly: ``s·(q − z) = s·(q − 8) + s·(8 − z)``. 2- and 3-bit codes are centred in the 4-bit range
(``q + 8 − 2^(b−1)``, the zero likewise), so that the bf16 offset stays small next to the weights. Per-row grids use the largest supported group that divides the width (the
same scale repeated); act-order layers are stored in their processing order, where groups are
contiguous, and the input is permuted to match. A ragged last group (576 inputs in groups of
128) is padded with zero inputs to a whole group.

The kernel is fast only for bf16 activations: with fp32 activations it is exact to fp32
rounding but 20-60x slower than a dense fp32 GEMV on this machine. ``int4_linear`` therefore
computes in bf16 by default (``x`` and the scales rounded to bf16; about 3e-3 relative error on
a layer's outputs) and in fp32 on request (the exactness check in the tests). It serves decoding;
the fp32 perplexity protocol uses the reference path (``kernels.dispatch``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.packing import unpack_codes

GROUP_SIZES = (256, 128, 64, 32)


@dataclass(frozen=True)
class Int4Pack:
    weight: torch.Tensor            # torch's packed layout, uint8 [N, K/2]
    scales_and_zeros: torch.Tensor  # fp32 [K/group, N, 2]: scale, and offset s·(8 − z)
    group_size: int
    perm: torch.Tensor | None       # input permutation (act-order), or None
    padding: int = 0                # zero inputs appended to fill the last group


def _kernel_group(layer) -> int | None:
    if layer.n_groups == 1:   # per row: the largest group that divides the width, else 32 (padded)
        return next((g for g in GROUP_SIZES if layer.in_features % g == 0), GROUP_SIZES[-1])
    return layer.group_size if layer.group_size in GROUP_SIZES else None


def unsupported_reason(layer) -> str | None:
    """Why ``layer`` cannot take the CPU int4 path, or None when it can."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return "this torch has no _weight_int4pack_mm_for_cpu"
    if layer.bits > 4:
        return f"{layer.bits}-bit weights (the kernel holds at most 4 bits)"
    if layer.out_features % 16:
        return f"out_features {layer.out_features} is not a multiple of 16"
    if _kernel_group(layer) is None:
        return f"group size {layer.group_size} (the kernel takes 32, 64, 128 or 256)"
    if layer.g_idx is not None:
        counts = torch.bincount(layer.g_idx.to(torch.int64), minlength=layer.n_groups)
        if not bool((counts[:-1] == layer.group_size).all()):
            return "act-order groups that are not full before the last"
    return None


def pack_for_cpu(layer) -> Int4Pack:
    """Convert a 2-, 3- or 4-bit ``QuantLinear`` to torch's layout (once; the caller caches it)."""
    group = _kernel_group(layer)
    codes = unpack_codes(layer.qweight, layer.bits, layer.in_features)           # [N, K]
    zeros = unpack_codes(layer.qzeros, layer.bits, layer.n_groups).to(torch.float32)
    scales = layer.scales.to(torch.float32)                              # [N, groups]
    perm = None
    if layer.g_idx is not None:
        perm = torch.argsort(layer.g_idx.to(torch.int64), stable=True)
        codes = codes[:, perm]
        col_group = layer.g_idx.to(torch.int64)[perm][::group]          # group of each kernel group
    elif layer.n_groups == 1:
        col_group = torch.zeros(-(-layer.in_features // group), dtype=torch.int64)
    else:
        col_group = torch.arange(layer.n_groups)
    padding = len(col_group) * group - layer.in_features
    codes = torch.nn.functional.pad(codes, (0, padding))                 # padded inputs are zero
    centre = 8 - (1 << (layer.bits - 1))
    codes = codes + centre
    s, z = scales[:, col_group], zeros[:, col_group] + centre           # [N, K/group]
    scales_and_zeros = torch.stack([s.T, (s * (8 - z)).T], dim=-1).contiguous()
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)
    return Int4Pack(weight, scales_and_zeros, group, perm, padding)


def int4_linear(
    x: torch.Tensor, pack: Int4Pack, bias: torch.Tensor | None, compute_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    if pack.perm is not None:
        flat = flat.index_select(-1, pack.perm)
    if pack.padding:
        flat = torch.nn.functional.pad(flat, (0, pack.padding))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        flat.to(compute_dtype).contiguous(), pack.weight, pack.group_size, pack.scales_and_zeros.to(compute_dtype)
    ).to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*lead, y.shape[-1])
