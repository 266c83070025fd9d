"""Block corrections and cross-layer absorption: small exact rewrites done while a block is compressed.

- D²Quant's deviation-aware correction (DAC): the mean of the MLP's
  input norm output shifts once the attention is quantized; the shift ``μ`` measured on the
  calibration tokens is added after the norm (:class:`ShiftedNorm`) while the MLP is calibrated,
  then folded into the MLP's input linears as a bias: ``Ŵ(n + μ) + b = Ŵn + (b + Ŵμ)``, exact, and
  a saved model needs no custom norm module.
- DSQ's column scale: ``down(act(gate x) ⊙ up x)`` with ``W_down = S·diag(c)`` equals ``S`` applied
  after ``up_proj``'s output rows are scaled by ``c``, i.e. its per-row dequantization scales (and
  bias): exact up to the fp16 rounding of the scaled scales.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import LlmpressError
from ..layers import CompressedLinear
from . import distributed
from .arch import declared_families
from .compressors import dense_proxy, dense_weight
from .hooks import BlockHooks
from .stage import register
from .stats import StopForward


class ShiftedNorm(nn.Module):
    """``norm(x) + shift``: a norm with a measured mean correction, during calibration only."""

    def __init__(self, norm: nn.Module, shift: torch.Tensor):
        super().__init__()
        self.norm, self.shift = norm, shift

    def forward(self, x, *args, **kwargs):
        out = self.norm(x, *args, **kwargs)
        return out + self.shift.to(out.dtype)


@torch.no_grad()
def norm_output_mean(norm: nn.Module, run: Callable[[], None], skip_first: int) -> torch.Tensor:
    """The mean over calibration tokens (all ranks) of ``norm``'s output, positions ``< skip_first``
    of each window left out; ``run()`` runs the block over every batch, and the forward stops at
    the norm."""
    acc: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        acc.append(_token_sum(output[0] if isinstance(output, tuple) else output, skip_first))
        raise StopForward

    handle = norm.register_forward_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return _mean(acc)


def _token_sum(out: torch.Tensor, skip_first: int) -> torch.Tensor:
    """``[sum over kept tokens..., count]`` (float64) of ``out [batch, seq, width]`` (or ``[tokens, width]``)."""
    kept = out[:, skip_first:] if out.dim() == 3 else out
    flat = kept.reshape(-1, kept.shape[-1]).to(torch.float64)
    return torch.cat([flat.sum(0), flat.new_tensor([flat.shape[0]])])


def _mean(acc: list[torch.Tensor]) -> torch.Tensor:
    if not acc:
        raise LlmpressError("the block correction saw no calibration tokens")
    total = torch.stack(acc).sum(0)
    distributed.all_reduce_sum([total])
    if total[-1] <= 0:
        raise LlmpressError("the block correction saw no calibration tokens (windows shorter than skip_first)")
    return total[:-1] / total[-1]


@torch.no_grad()
def block_output_mean(block: nn.Module, norm: nn.Module, run: Callable[[], None], skip_first: int) -> torch.Tensor:
    """The mean (all ranks) of ``norm`` applied to ``block``'s outputs over a ``run()``."""
    acc: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        out = output[0] if isinstance(output, tuple) else output
        acc.append(_token_sum(norm(out), skip_first))

    handle = block.register_forward_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return _mean(acc)


@torch.no_grad()
def batches_mean(hidden: torch.Tensor, batch_size: int, norm: nn.Module, skip_first: int) -> torch.Tensor:
    """The mean (all ranks) of ``norm(hidden)`` over ``[n, seq, width]`` hidden states, in batches."""
    device = next(norm.parameters()).device
    return _mean([_token_sum(norm(hidden[s:s + batch_size].to(device, torch.float32)), skip_first)
                  for s in range(0, hidden.shape[0], batch_size)])


def mean_shift(teacher: torch.Tensor, student: torch.Tensor, clip: float, scale: float) -> torch.Tensor:
    """DAC's ``μ = λ·clip(mean(T) − mean(S), ±clip)`` (fp32)."""
    return (scale * (teacher - student).clamp(-clip, clip)).to(torch.float32)


@torch.no_grad()
def fold_shift_into_bias(module: nn.Module, shift: torch.Tensor) -> None:
    """``b ← b + Ŵ·shift`` on a compressed module (its ``bias`` buffer is created if absent)."""
    if not isinstance(module, CompressedLinear):
        raise LlmpressError("the block correction folds into compressed linears only: compress the MLP's "
                            "input linears in the same recipe")
    weight = module.dequantize(torch.float32)
    add = weight @ shift.to(weight.device, torch.float32)
    dtype = getattr(module, "compute_dtype", torch.float32)
    module.bias = (module.bias.to(torch.float32) + add if module.bias is not None else add).to(dtype)


@torch.no_grad()
def absorb_column_scale(sink: nn.Module, scale: torch.Tensor) -> bool:
    """Scale ``sink``'s output rows by ``scale``: a uniform module's fp16 scales (and bias), or a
    plain linear's weight; False (nothing changed) for other formats."""
    from ..layers import QuantLinear

    if isinstance(sink, QuantLinear):
        scale = scale.to(sink.scales.device)
        sink.scales.copy_((sink.scales.to(torch.float32) * scale[:, None]).to(sink.scales.dtype))
    elif isinstance(sink, nn.Linear):
        w = sink.weight
        scale = scale.to(w.device)
        w.copy_((w.to(torch.float32) * scale[:, None]).to(w.dtype))
    else:
        return False
    if sink.bias is not None:
        sink.bias.copy_((sink.bias.to(torch.float32) * scale).to(sink.bias.dtype))
    return True


# -- the method ------------------------------------------------------------------------------

class DACStage(BaseModel):
    """A block correction (D²Quant's deviation-aware correction): once a block's attention is
    compressed, the mean shift ``μ`` of the MLP's input norm (full-precision block minus the block
    with compressed attention, on the compressed model's stream) is added after that norm, so the
    MLP is calibrated with it in place; it is then folded exactly into the MLP's input linears'
    biases (``b += Ŵ μ``). With ``final_norm`` the same for the model's final norm (teacher: the
    last block with its MLP still full precision), folded into a bias of the head."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    kind: ClassVar[str] = "correction"
    needs: ClassVar[frozenset[str]] = frozenset({"activations"})   # it runs the block on calibration data

    method: Literal["dac"] = "dac"
    clip: float = Field(10.0, gt=0)      # |μ| per channel is clipped to this (the reference's ±10)
    scale: float = Field(1.0, ge=0)      # λ: μ is multiplied by it (the reference's 1)
    skip_first: int = Field(1, ge=0)     # leading positions of each window left out of the means
                                         # (the attention-sink position has outlier norms)
    final_norm: bool = True              # also correct the final norm (folded into a head bias)

    @property
    def label(self) -> str:
        return "dac"



class DeviationAwareCorrection(BlockHooks):
    """DAC at the block's hook points: the full-precision means of the MLP's input norm at the
    start; the shift installed after that norm before the MLP's inputs are calibrated; folded into
    their biases once they are compressed. On the last block with ``final_norm``: the teacher mean
    of the final norm before the MLP is compressed, the student mean once the block's outputs are
    final, and their shift emitted as ``final_shift`` (the head's bias)."""

    @classmethod
    def check(cls, stage, plan, arch) -> None:
        if arch.mlp_norm is None or not arch.mlp_inputs:
            supported = declared_families(lambda a: a.mlp_norm is not None and bool(a.mlp_inputs))
            if arch.discovered:
                raise LlmpressError(f"the {stage.method} correction needs a declared map of the block's norms, and "
                                    f"{arch.family} has none (its linears were found by tracing); families with one: "
                                    f"{supported}")
            raise LlmpressError(f"the {stage.method} correction is not supported for the {arch.family} family; "
                                f"supported: {supported}")

    @classmethod
    def needs_final_outputs(cls, stage) -> bool:
        return stage.final_norm

    def __init__(self, stage: DACStage):
        super().__init__(stage)
        self.norm: nn.Module | None = None
        self.teacher = self.shift = None
        self.folded = False
        self.final_norm: nn.Module | None = None
        self.final_teacher: torch.Tensor | None = None

    def start(self, ctx) -> None:
        arch, plan, stage = ctx.arch, ctx.plan, self.stage
        if ctx.last and stage.final_norm:
            # a copy where the block runs (the model stays on the CPU); it is read, never changed
            self.final_norm = copy.deepcopy(ctx.model.get_submodule(arch.final_norm)).to(ctx.device)
        compressed = {n for n, s in plan.assignment.items() if s is not None}
        if arch.attention_output not in compressed or not set(arch.mlp_inputs) <= compressed:
            return   # nothing to correct: the attention output or the MLP's inputs stay dense
        if any(arch.attention_output in g and set(g) & set(arch.mlp_inputs) for g in plan.groups):
            raise LlmpressError("the dac correction needs true_sequential: the attention must be compressed "
                                "before the MLP's inputs are calibrated")
        self.norm = ctx.block.get_submodule(arch.mlp_norm)
        ctx.describe(f"block {ctx.index + 1} · correction: full-precision norm means")
        self.teacher = norm_output_mean(self.norm, ctx.run, stage.skip_first)

    def before_group(self, ctx, group) -> None:
        stage, arch = self.stage, ctx.arch
        if not set(group) & set(arch.mlp_inputs):
            return
        if self.final_norm is not None and self.final_teacher is None:
            ctx.describe(f"block {ctx.index + 1} · correction: full-precision final-norm means")
            self.final_teacher = block_output_mean(ctx.block, self.final_norm, ctx.run, stage.skip_first)
        if self.norm is not None and self.shift is None:
            ctx.describe(f"block {ctx.index + 1} · correction: mean shift of {arch.mlp_norm}")
            self.shift = mean_shift(self.teacher, norm_output_mean(self.norm, ctx.run, stage.skip_first),
                                    stage.clip, stage.scale)
            ctx.block.set_submodule(arch.mlp_norm, ShiftedNorm(self.norm, self.shift))

    def after_group(self, ctx, group) -> None:
        arch = ctx.arch
        if self.shift is None or self.folded or not set(arch.mlp_inputs) <= set(ctx.modules):
            return
        # Fold now, so that what follows (down_proj's statistics, the block's outputs) runs
        # through the biases exactly as the saved model will.
        ctx.block.set_submodule(arch.mlp_norm, self.norm)
        relative = float(self.shift.norm() / self.teacher.norm().clamp_min(1e-30))
        for name in arch.mlp_inputs:
            module = ctx.modules[name]
            fold_shift_into_bias(module, self.shift)
            ctx.block.set_submodule(name, dense_proxy(module, dense_weight(module), ctx.device))
            ctx.metrics[name]["dac_shift"] = relative
        self.folded = True

    def end(self, ctx) -> None:
        if self.norm is not None and not self.folded:
            ctx.block.set_submodule(ctx.arch.mlp_norm, self.norm)

    def outputs_ready(self, ctx) -> None:
        if self.final_teacher is None:
            return
        ctx.describe("final norm · correction")
        student = batches_mean(ctx.hidden, ctx.batch_size, self.final_norm, self.stage.skip_first)
        ctx.emit("final_shift", mean_shift(self.final_teacher, student, self.stage.clip, self.stage.scale).cpu())


register(DACStage, hooks=DeviationAwareCorrection)
