"""Options for one budget over several factorization families (the ``factor-mix`` allocator).

Every option of every family is scored by the same measure, the relative output error
``‖X ΔWᵀ‖ / ‖X Wᵀ‖`` on the calibration inputs, so the knapsack compares like with like.
Low rank is SVD-LLM's whitened truncation (its error follows from the singular values, so the
whole grid costs one SVD); TT is the activation-aware TT-SVD (one per grid point).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ...errors import LlmpressError
from ...formats.factor import factor_bits
from ...formats.tt import tt_full
from ...io.models import STORAGE_DTYPES
from ..stage import AllocatorStage, Built, FactorValues, register
from .knapsack import Option
from .lowrank import lowrank_module, rank_for_ratio
from .tt import (
    aware_tt_svd,
    balanced_modes,
    kronecker_whitening,
    rank_for_budget,
    relative_output_error,
    tt_module,
    tt_params,
    tt_ranks,
)
from .whiten import whiten, whitening_factor


def lowrank_options(weight: torch.Tensor, hessian: torch.Tensor, value_bits: int, grid) -> list[Option]:
    factor, _ = whitening_factor(hessian)
    s = torch.linalg.svdvals(whiten(weight, factor))
    energy = s.pow(2)
    total = float(energy.sum())
    out, inp = weight.shape
    options = []
    for removed in grid:
        rank = rank_for_ratio(inp, out, removed)
        if rank >= min(out, inp):
            continue
        err = (float(energy[rank:].sum()) / total) ** 0.5 if total > 0 else 0.0
        options.append(Option(removed, err, factor_bits(inp, out, rank, None, value_bits),
                              {"family": "lowrank", "ratio": removed}))
    return options


def tt_options(weight: torch.Tensor, hessian: torch.Tensor, value_bits: int, grid, order: int) -> list[Option]:
    out, inp = weight.shape
    out_modes, in_modes = balanced_modes(out, order), balanced_modes(inp, order)
    lowers = kronecker_whitening(hessian, in_modes)   # the same for every rank of this layer
    options = []
    for removed in grid:
        rank = rank_for_budget(out_modes, in_modes, (1.0 - removed) * out * inp)
        if rank is None:
            continue
        cores = aware_tt_svd(weight, hessian, out_modes, in_modes, rank, lowers)
        err = relative_output_error(tt_full(cores, (out, inp)) - weight.to(torch.float64), weight, hessian)
        bits = tt_params(out_modes, in_modes, tt_ranks(out_modes, in_modes, rank)) * value_bits
        options.append(Option(removed, err, bits, {"family": "tt", "ratio": removed}))
    return options


def mix_options(weight: torch.Tensor, hessian: torch.Tensor, value_bits: int, grid, families, order: int) -> list[Option]:
    options = []
    if "lowrank" in families:
        options += lowrank_options(weight, hessian, value_bits, grid)
    if "tt" in families:
        options += tt_options(weight, hessian, value_bits, grid, order)
    return options


# -- the method ------------------------------------------------------------------------------

class FactorMixStage(AllocatorStage):
    """One budget over several factorization families: each linear is kept dense, or takes
    whitened low rank (SVD-LLM) or activation-aware TT at one of the removed fractions, whichever
    the knapsack finds cheapest in relative output error."""

    method: Literal["factor-mix"] = "factor-mix"
    families: list[Literal["lowrank", "tt"]] = Field(default_factory=lambda: ["lowrank", "tt"], min_length=1)
    order: int = Field(3, ge=2, le=4)    # TT cores
    family: Literal["lowrank", "tt"] | None = None   # set per module by the allocation
    ratio: float | None = Field(None, gt=0, lt=1)
    values: FactorValues = "float16"     # the allocator counts bits at this width

    @property
    def label(self) -> str:
        return "factor-mix" if self.family is None else f"{self.family} -{self.ratio:.0%}"


def _mix(stage: FactorMixStage, weight, stats, bias, dtype) -> Built:
    if stage.family is None or stage.ratio is None:
        raise LlmpressError("no family was allocated to this module (the factor-mix plan is missing)")
    values = STORAGE_DTYPES[stage.values]
    if stage.family == "lowrank":
        return lowrank_module(weight, stats, stage.ratio, True, bias, dtype, values)
    return tt_module(weight, stats, stage.ratio, stage.order, True, bias, dtype, value_dtype=values)


def _mix_options(stage: FactorMixStage, weight, hessian, value_bits: int) -> list[Option]:
    return mix_options(weight, hessian, value_bits, stage.removed_grid, stage.families, stage.order)


register(FactorMixStage, compress=_mix, profile=_mix_options)
