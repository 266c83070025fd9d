"""The uniform integer grid as stored: codes, fp16 group scales and integer zeros.

``W[o, c] = scales[o, g] * (code[o, c] - zero[o, g])`` with ``g = g_idx[c]`` (or ``c // group_size``,
``0`` for a per-row grid). ``QuantizedWeight`` is what every uniform solver returns;
``dequantize_uniform`` reads the packed layout ``QuantLinear`` stores (the oracle for the kernels).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .packing import unpack_codes


@dataclass
class QuantizedWeight:
    """Codes and grid of one ``[out, in]`` weight.

    ``codes`` are integers in ``[0, 2^bits)``; ``scales``/``zeros`` are ``[out, n_groups]``;
    input column ``c`` uses group ``g_idx[c]`` (``None`` means ``c // group_size``, or the single
    per-row group). Scales are fp16-representable, so ``dequantize()`` is exactly what is stored.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor | None
    bits: int
    group_size: int
    sym: bool
    metrics: dict[str, float] = field(default_factory=dict)

    def group_of_column(self) -> torch.Tensor:
        in_features = self.codes.shape[1]
        if self.g_idx is not None:
            return self.g_idx.to(torch.int64)
        if self.scales.shape[1] == 1:
            return torch.zeros(in_features, dtype=torch.int64)
        return torch.arange(in_features) // self.group_size

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """The same weight with its tensors on ``device``."""
        move = (lambda t: t.to(device) if t is not None else None)
        return replace(self, codes=move(self.codes), scales=move(self.scales), zeros=move(self.zeros),
                       g_idx=move(self.g_idx))

    def dequantize(self) -> torch.Tensor:
        cols = self.group_of_column()
        return self.scales[:, cols] * (self.codes.to(torch.float32) - self.zeros[:, cols])


def group_count(columns: int, group_size: int) -> int:
    """Number of groups along the input dimension; the last group may be ragged."""
    return 1 if group_size <= 0 else -(-columns // group_size)


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
