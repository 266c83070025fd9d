"""Options for one budget over several factorization families (the ``factor-mix`` allocator).

Every option of every family is scored by the same measure, the relative output error
``‖X ΔWᵀ‖ / ‖X Wᵀ‖`` on the calibration inputs, so the knapsack compares like with like.
Low rank is SVD-LLM's whitened truncation (its error follows from the singular values, so the
whole grid costs one SVD); TT is the activation-aware TT-SVD (one per grid point).
"""

from __future__ import annotations

import torch

from ...formats.factor import factor_bits
from ...formats.tt import tt_full
from .knapsack import Option
from .lowrank import rank_for_ratio
from .tt import (
    aware_tt_svd,
    balanced_modes,
    kronecker_whitening,
    rank_for_budget,
    relative_output_error,
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
