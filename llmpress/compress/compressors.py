"""One linear through its stage's method: the compressed module, its errors and its dense weight."""

from __future__ import annotations

import torch
from torch import nn

from ..devices import to_device
from ..errors import LlmpressError
from .hooks import LinearProcessor
from .phases import add_flops, phase
from .stage import StageBase, method_of


def dense_weight(module: nn.Module, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The compressed module's function as a fp32 ``[out, in]`` weight on its original inputs:
    ``W·diag(input_scale)`` while a scale waits to be absorbed upstream (DSQ's ``c``)."""
    dense = module.dequantize(torch.float32)
    return dense * input_scale if input_scale is not None else dense


def dense_proxy(module: nn.Module, weight: torch.Tensor, device: torch.device | None = None) -> nn.Linear:
    """A plain linear with the compressed module's dequantized weight (fp32 ``[out, in]``): the same
    function, without dequantizing again on every calibration batch; on ``device`` (default: the
    weight's), where the block runs."""
    weight = weight.to(device) if device is not None else weight
    proxy = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device="meta")
    proxy.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        proxy.bias = nn.Parameter(module.bias.to(weight.device, weight.dtype), requires_grad=False)
    return proxy


def data_free(stage: StageBase, in_features: int) -> tuple[StageBase, dict]:
    """The stage and statistics for a linear that too few calibration tokens reached (an expert the
    router rarely picked), whose Hessian would be noise: round-to-nearest on the stage's own grid
    for a uniform quantizer (GPTQ and its residual variants reduce to it without data), else the
    stage itself against an identity Hessian (every input direction weighted alike)."""
    from .quant.rtn import RTNStage

    if getattr(stage, "codes_on_own_grid", False):
        rtn = RTNStage(bits=stage.bits, group_size=stage.group_size, sym=stage.sym, mse=stage.mse, grid=stage.grid,
                       imatrix=False)
        return rtn, {}
    return stage, {"hessian": identity_hessian(in_features)} if stage.needs else {}


def identity_hessian(n: int) -> torch.Tensor:
    """A Hessian that weighs every input direction alike, at the ``2/N Σ x xᵀ`` scale of unit inputs:
    the statistics of a linear no calibration token reached."""
    return torch.eye(n) * 2.0


def linear_weight(linear: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` fp32."""
    return linear.weight.detach().to(torch.float32)


def output_error(delta: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||ΔW X||² / ||W X||²`` on the calibration inputs, from ``H ∝ X Xᵀ``."""
    add_flops(4.0 * weight.numel() * hessian.shape[0])
    num = ((delta @ hessian) * delta).sum()
    den = ((weight @ hessian) * weight).sum()
    return float(num / den) if den > 0 else float("nan")


def compress_linear(
    stage: StageBase, linear: nn.Module, stats: dict, *, dtype: torch.dtype, processor: LinearProcessor | None = None,
) -> tuple[nn.Module, dict[str, float], torch.Tensor, torch.Tensor | None]:
    """The compressed module, its metrics (errors relative to the original weight), its fp32
    ``[out, in]`` weight (the pipeline computes with it during calibration), and the per-input
    scale its weight still needs (``None`` unless the method leaves one for a block hook to absorb
    upstream: DSQ's ``c``). With a ``processor`` the method solves the problem in its bases and
    the module it returns is wrapped to compute in the original ones.

    The solve runs where the linear is when the stage says it ``solves_on_device`` (GPTQ on its
    uniform grid), else on the CPU with the statistics copied there; either way the module comes
    back on the CPU (packing is CPU code) and the dense weight where the linear is."""
    block_device = linear.weight.device
    solve_device = block_device if stage.solves_on_device else torch.device("cpu")
    weight = linear_weight(linear).to(solve_device)
    stats = to_device(stats, solve_device)
    bias = linear.bias.detach().cpu() if linear.bias is not None else None
    if not torch.isfinite(weight).all():
        from ..errors import ModelLoadError

        raise ModelLoadError("the weight has NaN or Inf entries; refusing to quantize a broken checkpoint")
    if processor is None:
        module, metrics, *rest = method_of(stage).compress(stage, weight, stats, bias, dtype)
    else:
        module, metrics, *rest = method_of(stage).compress(stage, processor.weight.to(solve_device),
                                                            to_device(processor.stats, solve_device), None, dtype)
        if rest and rest[0] is not None:
            raise LlmpressError(f"`{stage.method}` leaves an input scale, which a processed linear cannot absorb")
        module = processor.wrap(module, bias, dtype)
        metrics = {**metrics, **processor.metrics}
    module.to("cpu")
    input_scale = rest[0].cpu() if rest and rest[0] is not None else None
    metrics = dict(metrics)
    dense = dense_weight(module, input_scale).to(solve_device)
    with phase("metrics"):
        delta = dense - weight
        metrics["weight_error"] = float(delta.norm() / weight.norm()) if weight.norm() > 0 else 0.0
        if "hessian" in stats:
            metrics["output_error"] = output_error(delta, weight, stats["hessian"])
    if "input_drift" in stats:
        metrics["input_drift"] = stats["input_drift"]
    metrics["bits_per_weight"] = module.stored_bits() / weight.numel()
    return module, metrics, dense.to(block_device), input_scale
