"""Binary-coded weights with power-of-two scales (ShiftAdd's storage).

A weight is ``Σ_t α_t · b_t`` over bit-planes ``b_t ∈ {−1, +1}``; each scale ``α`` is a sum of
``terms`` signed powers of two, stored as exponents and signs, shared by a block of ``col_block``
input columns × ``out/row_groups`` output rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def apot_value(exps: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``Σ_p sign_p·2^exp_p`` over the last dimension (float64)."""
    return (signs.to(torch.float64) * torch.exp2(exps.to(torch.float64))).sum(-1)


@dataclass
class BCQWeight:
    """The result of a BCQ quantizer, in the layout ``BCQLinear`` stores."""

    signs: torch.Tensor        # [q, out, in] bool (True: +1)
    alpha_exp: torch.Tensor    # [q, row_groups, col_blocks, terms] int8
    alpha_sign: torch.Tensor   # same shape, int8 in {−1, 0, 1}
    col_block: int
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def bits(self) -> int:
        return self.signs.shape[0]


def bcq_dense(signs: torch.Tensor, alpha_exp: torch.Tensor, alpha_sign: torch.Tensor, col_block: int) -> torch.Tensor:
    """``Σ_t α_t ⊙ b_t`` ``[out, in]`` (float64), the scales expanded over their blocks."""
    _, out, inp = signs.shape
    row_groups = alpha_exp.shape[1]
    alpha = apot_value(alpha_exp, alpha_sign)                    # [q, R, C]
    alpha = alpha.repeat_interleave(out // row_groups, 1).repeat_interleave(col_block, 2)[:, :, :inp]
    return (alpha * (signs.to(torch.float64) * 2 - 1)).sum(0)
