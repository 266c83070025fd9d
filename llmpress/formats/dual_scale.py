"""D²Quant's dual-scale binary-coded weights: ``W[i, j] = c_j · Σ_t r_t[i, g(j)]·b_t[i, j]``.

Bit-planes ``b_t ∈ {−1, +1}``, fp16 row-group scales ``r`` and an fp16 column scale ``c`` (absent
once absorbed into the layer upstream).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DualScaleWeight:
    """The binary-coded DSQ result, in the layout ``DualScaleLinear`` stores."""

    signs: torch.Tensor          # [k, out, in] bool (True: +1)
    scales: torch.Tensor         # [k, out, n_groups] fp16 values (r)
    column_scale: torch.Tensor   # [in] fp16 values (c)
    group_size: int
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def bits(self) -> int:
        return self.signs.shape[0]


def dual_scale_dense(signs: torch.Tensor, scales: torch.Tensor, group_size: int,
                     column_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``[out, in]`` float32: ``c_j · Σ_t r_t[i, g(j)]·b_t[i, j]`` (``c = 1`` when absorbed)."""
    inp = signs.shape[2]
    r = scales.to(torch.float32).repeat_interleave(group_size, 2)[:, :, :inp]
    dense = (r * (signs.to(torch.float32) * 2 - 1)).sum(0)
    return dense * column_scale.to(torch.float32) if column_scale is not None else dense
