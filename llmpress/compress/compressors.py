"""Layer compressors: ``(weight, bias, stats, stage) -> compressed module``, knowing no model."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import LlmpressError
from ..layers import FactorLinear, QuantLinear
from .factor.lowrank import Factors, rank_for_ratio, svd_factors, whitened_svd_factors
from .factor.rocket import rocket_factors
from .quant.gptq import Residual, gptq_quantize
from .quant.result import QuantizedWeight
from .quant.rtn import rtn_quantize
from .recipe import GPTQStage, LowRankStage, RocketStage, RTNStage, StageBase


def _rtn(stage: RTNStage, weight: torch.Tensor, stats: dict) -> QuantizedWeight:
    return rtn_quantize(weight, bits=stage.bits, group_size=stage.group_size, sym=stage.sym, mse=stage.mse)


def _gptq(stage: GPTQStage, weight: torch.Tensor, stats: dict) -> QuantizedWeight:
    residual = None
    if stage.residual != "none":
        mode = stage.rescomp_mode
        if mode == "auto":   # ResComp's rule: its 'allw' mode can diverge at 2 bits
            mode = "org" if stage.bits == 2 else "allw"
        residual = Residual(
            stats["cross"], alpha=stage.alpha, rescomp=stage.residual == "rescomp", alpha2=stage.alpha2,
            form=stage.rescomp_form, mode=mode,
        )
    return gptq_quantize(
        weight, stats["hessian"], bits=stage.bits, group_size=stage.group_size, sym=stage.sym,
        mse=stage.mse, act_order=stage.act_order, static_groups=stage.static_groups,
        damp=stage.damp, block_size=stage.block_size, residual=residual,
    )


def _lowrank(stage: LowRankStage, weight: torch.Tensor, stats: dict) -> Factors:
    rank = rank_for_ratio(weight.shape[1], weight.shape[0], stage.ratio)
    if stage.method == "svd":
        return svd_factors(weight, rank)
    return whitened_svd_factors(weight, stats["hessian"], rank)


def _rocket(stage: RocketStage, weight: torch.Tensor, stats: dict) -> Factors:
    if stage.rank is None:
        raise LlmpressError("no rank was allocated to this module (the ROCKET plan is missing)")
    return rocket_factors(weight, stats["hessian"], stage.rank, stage.nnz, stage.lam)


SOLVERS: dict[type[StageBase], Callable[..., QuantizedWeight]] = {RTNStage: _rtn, GPTQStage: _gptq}
FACTORIZERS: dict[type[StageBase], Callable[..., Factors]] = {LowRankStage: _lowrank, RocketStage: _rocket}


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
    if type(stage) in FACTORIZERS:
        result = FACTORIZERS[type(stage)](stage, weight, stats)
        module = FactorLinear.from_factors(result, linear.bias, dtype)
    else:
        result = SOLVERS[type(stage)](stage, weight, stats)
        module = QuantLinear.from_quantized(result, linear.bias, dtype)
    dense = module.dequantize(torch.float32)
    delta = dense - weight
    metrics = dict(result.metrics)
    metrics["weight_error"] = float(delta.norm() / weight.norm()) if weight.norm() > 0 else 0.0
    if "hessian" in stats:
        metrics["output_error"] = output_error(delta, weight, stats["hessian"])
    if "input_drift" in stats:
        metrics["input_drift"] = stats["input_drift"]
    metrics["bits_per_weight"] = module.stored_bits() / weight.numel()
    return module, metrics, dense
