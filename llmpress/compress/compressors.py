"""Layer compressors: ``(weight, bias, stats, stage) -> compressed module``, knowing no model."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import LlmpressError
from ..formats.bcq import bcq_dense
from ..formats.uniform import QuantizedWeight
from ..layers import BCQLinear, DualScaleLinear, FactorLinear, QuantLinear, TTLinear
from .factor import rocket
from .factor.knapsack import Option
from .factor.lowrank import rank_for_ratio, svd_factors, whitened_svd_factors
from .factor.mix import mix_options
from .factor.tt import tt_factorize
from .quant.bcq import bcq_quantize
from .quant.dsq import dsq_quantize, fit_column_scale
from .quant.gptq import Residual, damped_inverse_cholesky, gptq_quantize
from .quant.rtn import rtn_quantize
from .recipe import (
    DSQStage,
    FactorMixStage,
    GPTQStage,
    LowRankStage,
    RocketStage,
    RTNStage,
    ShiftAddMixStage,
    ShiftAddStage,
    StageBase,
    TTStage,
)


def _rtn(stage: RTNStage, weight: torch.Tensor, stats: dict) -> QuantizedWeight:
    return rtn_quantize(weight, bits=stage.bits, group_size=stage.group_size, sym=stage.sym, mse=stage.mse)


def _residual(stage: GPTQStage, stats: dict, column_scale: torch.Tensor | None = None) -> Residual | None:
    """GPTAQ's (and ResComp's) residual statistics for ``stage``, in the inputs scaled by
    ``column_scale`` when the weight is solved as ``W·diag(1/c)``."""
    if stage.residual == "none":
        return None
    mode = stage.rescomp_mode
    if mode == "auto":   # ResComp's rule: its 'allw' mode can diverge at 2 bits
        mode = "org" if stage.bits == 2 else "allw"
    cross = stats["cross"]
    if column_scale is not None:
        cross = column_scale[:, None] * cross * column_scale[None, :]
    return Residual(cross, alpha=stage.alpha, rescomp=stage.residual == "rescomp", alpha2=stage.alpha2,
                    form=stage.rescomp_form, mode=mode)


def _gptq(stage: GPTQStage, weight: torch.Tensor, stats: dict) -> QuantizedWeight:
    return gptq_quantize(
        weight, stats["hessian"], bits=stage.bits, group_size=stage.group_size, sym=stage.sym,
        mse=stage.mse, act_order=stage.act_order, static_groups=stage.static_groups,
        damp=stage.damp, block_size=stage.block_size, residual=_residual(stage, stats),
    )


# Factorizations build their module directly: (stage, weight, stats, bias, dtype) -> (module, metrics).
Built = tuple[nn.Module, dict[str, float]]


def _lowrank_module(weight: torch.Tensor, stats: dict, ratio: float, whitened: bool, bias, dtype) -> Built:
    rank = rank_for_ratio(weight.shape[1], weight.shape[0], ratio)
    factors = whitened_svd_factors(weight, stats["hessian"], rank) if whitened else svd_factors(weight, rank)
    return FactorLinear.from_factors(factors, bias, dtype), factors.metrics


def _tt_module(weight: torch.Tensor, stats: dict, ratio: float, order: int, aware: bool, bias, dtype,
               refit: int = 0) -> Built:
    try:
        cores, metrics = tt_factorize(weight, ratio, order, stats["hessian"] if aware else None, refit)
    except ValueError as e:
        raise LlmpressError(str(e)) from None
    return TTLinear.from_cores(cores, tuple(weight.shape), bias, dtype), metrics


def _lowrank(stage: LowRankStage, weight, stats, bias, dtype) -> Built:
    return _lowrank_module(weight, stats, stage.ratio, stage.method == "svdllm", bias, dtype)


def _tt(stage: TTStage, weight, stats, bias, dtype) -> Built:
    return _tt_module(weight, stats, stage.ratio, stage.order, stage.aware, bias, dtype, stage.refit)


def _rocket(stage: RocketStage, weight, stats, bias, dtype) -> Built:
    if stage.rank is None:
        raise LlmpressError("no rank was allocated to this module (the ROCKET plan is missing)")
    factors = rocket.rocket_factors(weight, stats["hessian"], stage.rank, stage.nnz, stage.lam)
    return FactorLinear.from_factors(factors, bias, dtype), factors.metrics


def _mix(stage: FactorMixStage, weight, stats, bias, dtype) -> Built:
    if stage.family is None or stage.ratio is None:
        raise LlmpressError("no family was allocated to this module (the factor-mix plan is missing)")
    if stage.family == "lowrank":
        return _lowrank_module(weight, stats, stage.ratio, True, bias, dtype)
    return _tt_module(weight, stats, stage.ratio, stage.order, True, bias, dtype)


def _shiftadd(stage: ShiftAddStage, weight, stats, bias, dtype) -> Built:
    try:
        q = bcq_quantize(weight, stats.get("hessian") if stage.gptq else None, bits=stage.bits,
                         col_block=stage.col_block, row_groups=stage.row_groups, rounds=stage.rounds,
                         terms=stage.terms, damp=stage.damp, block_size=stage.block_size)
    except ValueError as e:
        raise LlmpressError(str(e)) from None
    return BCQLinear.from_bcq(q, bias, dtype), q.metrics


def _dsq(stage: DSQStage, weight, stats, bias, dtype) -> Built:
    """Both forms hold the column scale ``c`` until the pipeline absorbs it upstream: the binary
    module stores it (``column_scale``), the uniform one carries it as ``pending_column_scale``."""
    hessian = stats["hessian"]
    if stage.form == "binary":
        q = dsq_quantize(weight, hessian, bits=stage.bits, group_size=stage.group_size, rounds=stage.rounds,
                         gar=stage.act_order, damp=stage.damp, block_size=stage.block_size,
                         residual=_residual(stage, stats))
        return DualScaleLinear.from_dsq(q, bias, dtype), q.metrics
    c = fit_column_scale(weight, stage.bits, stage.group_size, stage.sym, stage.rounds)
    # W x = (W/c)(c ⊙ x): the scaled weight against the Hessian of the scaled inputs
    q = gptq_quantize(
        weight / c, c[:, None] * hessian * c[None, :], bits=stage.bits, group_size=stage.group_size, sym=stage.sym,
        mse=stage.mse, act_order=stage.act_order, static_groups=stage.static_groups, damp=stage.damp,
        block_size=stage.block_size, residual=_residual(stage, stats, c),
    )
    module = QuantLinear.from_quantized(q, bias, dtype)
    module.pending_column_scale = c
    return module, q.metrics


def column_scale(module: nn.Module) -> torch.Tensor | None:
    """The per-input-column scale a compressed module still applies (DSQ's ``c``), or None."""
    stored = getattr(module, "column_scale", None)
    return stored.to(torch.float32) if stored is not None else getattr(module, "pending_column_scale", None)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The compressed module's function as a fp32 ``[out, in]`` weight on its original inputs (a
    column scale still waiting to be absorbed upstream included)."""
    dense = module.dequantize(torch.float32)
    pending = getattr(module, "pending_column_scale", None)
    return dense * pending if pending is not None else dense


SOLVERS: dict[type[StageBase], Callable[..., QuantizedWeight]] = {RTNStage: _rtn, GPTQStage: _gptq}
BUILDERS: dict[type[StageBase], Callable[..., Built]] = {
    LowRankStage: _lowrank, TTStage: _tt, RocketStage: _rocket, FactorMixStage: _mix, ShiftAddStage: _shiftadd,
    ShiftAddMixStage: _shiftadd, DSQStage: _dsq,
}


# Allocators' profiling: (stage, weight, hessian, value_bits) -> the layer's options.
def _rocket_options(stage: RocketStage, weight, hessian, value_bits: int) -> list[Option]:
    return rocket.candidates(rocket.profile_layer(weight, hessian), value_bits, stage.removed_grid, stage.kappas, stage.lam)


def _mix_options(stage: FactorMixStage, weight, hessian, value_bits: int) -> list[Option]:
    return mix_options(weight, hessian, value_bits, stage.removed_grid, stage.families, stage.order)


def _shiftadd_options(stage: ShiftAddMixStage, weight, hessian, value_bits: int) -> list[Option]:
    """Each bit width's GPTQ-BCQ solution, scored by its output error ``tr(ΔW H ΔWᵀ)`` (absolute:
    the layer's share of the error, H the per-token Gram) and sized by its code bits."""
    heuristic = shiftadd_sensitivity(weight, hessian, stage.damp)
    options = []
    for bits in stage.bit_choices:
        q = bcq_quantize(weight, hessian, bits=bits, col_block=stage.col_block, row_groups=stage.row_groups,
                         rounds=stage.rounds, terms=stage.terms, damp=stage.damp, block_size=stage.block_size)
        delta = bcq_dense(q.signs, q.alpha_exp, q.alpha_sign, q.col_block) - weight.to(torch.float64)
        error = float(((delta @ hessian.to(torch.float64)) * delta).sum())
        options.append(Option(1.0 - bits / value_bits, error, bits * weight.numel(), {"bits": bits},
                              {"heuristic": heuristic}))
    return options


def shiftadd_sensitivity(weight: torch.Tensor, hessian: torch.Tensor, damp: float) -> float:
    """The reference code's ranking score ``‖W'‖_F·std(W')²`` with ``W' = W / diag(U)``, U the upper
    Cholesky factor of the damped inverse Hessian (compared with our measured errors in the summary)."""
    upper, _ = damped_inverse_cholesky(hessian.to(torch.float64), damp)
    scaled = weight.to(torch.float64) / torch.diagonal(upper)
    return float(scaled.norm() * scaled.std() ** 2)


PROFILERS: dict[type[StageBase], Callable[..., list[Option]]] = {
    RocketStage: _rocket_options, FactorMixStage: _mix_options, ShiftAddMixStage: _shiftadd_options,
}


def linear_weight(linear: nn.Module, transposed: bool) -> torch.Tensor:
    """The weight as ``[out, in]`` fp32 (GPT-2's Conv1D stores ``[in, out]``)."""
    w = linear.weight.detach()
    return (w.T if transposed else w).to(torch.float32)


def output_error(delta: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||ΔW X||² / ||W X||²`` on the calibration inputs, from ``H ∝ X Xᵀ``."""
    num = ((delta @ hessian) * delta).sum()
    den = ((weight @ hessian) * weight).sum()
    return float(num / den) if den > 0 else float("nan")


def compress_linear(
    stage: StageBase, linear: nn.Module, stats: dict, *, transposed: bool, dtype: torch.dtype
) -> tuple[nn.Module, dict[str, float], torch.Tensor]:
    """The compressed module, its metrics (errors relative to the original weight), and its
    dequantized fp32 ``[out, in]`` weight (the pipeline computes with it during calibration)."""
    weight = linear_weight(linear, transposed)
    if not torch.isfinite(weight).all():
        from ..errors import ModelLoadError

        raise ModelLoadError("the weight has NaN or Inf entries; refusing to quantize a broken checkpoint")
    if type(stage) in BUILDERS:
        module, metrics = BUILDERS[type(stage)](stage, weight, stats, linear.bias, dtype)
        metrics = dict(metrics)
    else:
        result = SOLVERS[type(stage)](stage, weight, stats)
        module = QuantLinear.from_quantized(result, linear.bias, dtype)
        metrics = dict(result.metrics)
    dense = dense_weight(module)
    delta = dense - weight
    metrics["weight_error"] = float(delta.norm() / weight.norm()) if weight.norm() > 0 else 0.0
    if "hessian" in stats:
        metrics["output_error"] = output_error(delta, weight, stats["hessian"])
    if "input_drift" in stats:
        metrics["input_drift"] = stats["input_drift"]
    metrics["bits_per_weight"] = module.stored_bits() / weight.numel()
    return module, metrics, dense
