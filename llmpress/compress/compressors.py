"""One linear through its stage's method: the compressed module, its errors and its dense weight."""

from __future__ import annotations

import torch
from torch import nn

from .stage import StageBase, method_of


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


# Allocators' profiling: (stage, weight, hessian, value_bits) -> the layer's options.
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
    module, metrics = method_of(stage).compress(stage, weight, stats, linear.bias, dtype)
    metrics = dict(metrics)
    dense = dense_weight(module)
    delta = dense - weight
    metrics["weight_error"] = float(delta.norm() / weight.norm()) if weight.norm() > 0 else 0.0
    if "hessian" in stats:
        metrics["output_error"] = output_error(delta, weight, stats["hessian"])
    if "input_drift" in stats:
        metrics["input_drift"] = stats["input_drift"]
    metrics["bits_per_weight"] = module.stored_bits() / weight.numel()
    return module, metrics, dense
