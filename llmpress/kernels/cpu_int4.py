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
a layer's outputs) and in fp32 on request (the exactness check in the tests). It serves decoding
where the C++ GEMV's AVX-512 path does not (that one reads the stored codes, with no copy in
this layout); the fp32 perplexity protocol uses the reference path (``kernels.dispatch``).

With the C++ kernels built, ``int4_linear`` makes its few torch calls (conversion, act-order's
permutation, padding, the GEMM) in one crossing from Python (``int4_rows``).

Linears that read the same input (q/k/v, gate/up) can run as one GEMM (``SharedInputGemm``):
each call of the kernel costs some 20 µs beyond its weights at decode sizes, and converting
the input to bf16 once instead of three times saves as much again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..formats.packing import unpack_codes
from . import cpu_ext
from .derived import Derived
from .grouping import SharedInputGroup, same_optional

GROUP_SIZES = (256, 128, 64, 32)


@dataclass(frozen=True)
class Int4Pack:
    weight: torch.Tensor            # torch's packed layout, uint8 [N, K/2]
    scales_and_zeros: torch.Tensor  # [K/group, N, 2] in the compute dtype: scale, and offset s·(8 − z)
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


def _centred_codes(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """A layer's codes in the kernel's grid, before torch's packing (which interleaves output rows,
    so packs cannot be concatenated afterwards): int32 codes ``[N, K + padding]``, fp32 scales and
    offsets ``[K/group, N, 2]``, the input permutation, the padding."""
    group = _kernel_group(layer)
    codes = unpack_codes(layer.qweight, layer.bits, layer.in_features)           # [N, K]
    zeros = unpack_codes(layer.qzeros, layer.bits, layer.n_groups).to(torch.float32)
    scales = layer.scales.to(torch.float32)                              # [N, groups]
    perm = layer.input_order   # held in group order (layers.quant_linear): contiguous groups, permuted input
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
    s, z = scales[:, col_group], zeros[:, col_group] + centre           # [N, K/group]
    scales_and_zeros = torch.stack([s.T, (s * (8 - z)).T], dim=-1)
    return (codes + centre).to(torch.int32), scales_and_zeros, perm, padding


def pack_for_cpu(layers, compute_dtype: torch.dtype = torch.bfloat16) -> Int4Pack:
    """Convert a 2-, 3- or 4-bit ``QuantLinear`` (or linears that read one input, see
    ``can_share_input``, stacked along the outputs) to torch's layout, with the scales in the dtype
    the kernel will compute in. Done once; the caller caches it."""
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    parts = [_centred_codes(layer) for layer in layers]
    codes = torch.cat([p[0] for p in parts]).contiguous()
    scales_and_zeros = torch.cat([p[1] for p in parts], dim=1).to(compute_dtype).contiguous()
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    return Int4Pack(weight, scales_and_zeros, _kernel_group(layers[0]), parts[0][2], parts[0][3])


def int4_linear(x: torch.Tensor, pack: Int4Pack, bias: torch.Tensor | None) -> torch.Tensor:
    """``x · Wᵀ (+ bias)`` in the pack's compute dtype; the result in ``x``'s dtype. Few torch
    calls: at decode sizes each costs as much as a small layer's arithmetic."""
    ext = cpu_ext.extension()
    if ext is not None:   # the same operations in one crossing from Python
        return ext.int4_rows(x, pack.weight, pack.group_size, pack.scales_and_zeros, pack.perm, pack.padding, bias)
    flat = x.reshape(-1, x.shape[-1]).to(pack.scales_and_zeros.dtype)
    if pack.perm is not None:
        flat = flat.index_select(-1, pack.perm)
    if pack.padding:
        flat = torch.nn.functional.pad(flat, (0, pack.padding))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, pack.weight, pack.group_size, pack.scales_and_zeros)
    y = y.to(x.dtype) if bias is None else torch.add(bias, y)   # bias is in x's dtype
    return y.view(*x.shape[:-1], y.shape[-1])


def pack_key(layer) -> tuple:
    """Changes whenever the layer's packed tensors do (a cached pack is stale then). Read from the
    buffer dict: ``nn.Module.__getattr__`` costs about a microsecond a name, and this runs for every
    linear of every decoded token."""
    buffers = layer._buffers
    qweight = buffers["qweight"]
    return (qweight.data_ptr(), qweight._version, buffers["scales"]._version, buffers["qzeros"]._version)


def can_share_input(layers: Sequence) -> bool:
    """Whether ``layers`` can run as one int4 GEMM: each fits the kernel, and they read their
    input the same way (width, kernel group, act-order permutation). Bit widths may differ: the
    codes are centred per layer."""
    first = layers[0]
    for layer in layers:
        if unsupported_reason(layer) is not None or layer.in_features != first.in_features:
            return False
        if _kernel_group(layer) != _kernel_group(first) or not same_optional(layer.g_idx, first.g_idx):
            return False
        if not same_optional(layer.input_order, first.input_order):
            return False
    return True


class SharedInputGemm(SharedInputGroup):
    """Linears that read one input tensor as one int4 GEMM (``SharedInputGroup``)."""

    path = "cpu-int4"

    def __init__(self, members: Sequence) -> None:
        if len(members) < 2 or not can_share_input(members):
            raise ValueError("these linears cannot share one int4 GEMM")
        super().__init__(members)
        self._pack: Derived[tuple[Int4Pack, torch.Tensor | None]] = Derived()

    def fused(self) -> tuple[Int4Pack, torch.Tensor | None]:
        """The members as one pack (rebuilt when any member's packed tensors changed), and their
        biases side by side (None where none has one)."""
        return self._pack.get(lambda: tuple(pack_key(m) for m in self.members), self._build)

    def _build(self) -> tuple[Int4Pack, torch.Tensor | None]:
        bias = None
        if any(m.bias is not None for m in self.members):
            bias = torch.cat([torch.zeros(m.out_features) if m.bias is None else m.bias.float() for m in self.members])
        return pack_for_cpu(self.members), bias

    def compute(self, x: torch.Tensor) -> list[torch.Tensor]:
        pack, bias = self.fused()
        return list(int4_linear(x, pack, None if bias is None else bias.to(x.dtype)).split(
            [m.out_features for m in self.members], dim=-1))
