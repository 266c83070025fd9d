"""The output every uniform-grid solver returns, independent of how it is stored."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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

    def dequantize(self) -> torch.Tensor:
        cols = self.group_of_column()
        return self.scales[:, cols] * (self.codes.to(torch.float32) - self.zeros[:, cols])
