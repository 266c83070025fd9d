"""Block-wise output tuning (SignRound's step, after any uniform quantizer).

Once every linear of a block is quantized (RTN, GPTQ, GPTAQ, rotated or not), the rounding and the
grid are tuned so that the *block's output* matches the full-precision block's on calibration data:

    Ŵ = s·α · (clamp(⌊c + v⌉, 0, 2^b − 1) − ⌊z + β⌉)

with ``c``, ``s``, ``z`` the starting quantizer's codes, fp16 scales and integer zeros, a rounding
offset ``v ∈ [−1, 1]`` per weight, a scale factor ``α ∈ [1 − r, 1 + r]`` and a zero shift
``β ∈ [−1, 1]`` per group (no zero shift on a symmetric grid), ``⌊·⌉`` rounded with a
straight-through gradient. At ``v = 0, α = 1, β = 0`` it is the starting point exactly. The loss is
the mean squared error between the block's output and the full-precision block's output on the
same inputs (the compressed model's stream into this block), or with ``teacher_inputs:
full-precision`` the dense model's own output of the block (auto-round's target), minimised with
signed gradient descent (SignRound's optimiser; ``optimizer: adam`` for Adam) over ``steps``
steps of ``batch`` windows; every ``eval_every`` steps the loss on held-out windows (the last
``holdout`` calibration windows, never trained on) is measured, and the best state seen, the
starting point included, is what is kept. The result is stored in the starting quantizer's own packed format.

Departures from SignRound, all for a CPU budget or for starting from GPTQ: SignRound rounds the
full-precision weight (``⌊W/s + v⌉``, ``v ∈ [−0.5, 0.5]``), which starts from round-to-nearest;
starting from GPTQ's codes, which are integers already, a bound of ±0.5 could never change one, so
``v`` moves a code by at most one step either way. SignRound tunes min/max clipping factors in
[0.5, 1]; here the scale and the (integer) zero are tuned directly. Its defaults are 200 steps of 8
windows of 2048 tokens; ours 40 steps of one calibration window (2-core CPU).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ...errors import LlmpressError
from ...formats.packing import unpack_codes
from ...formats.uniform import QuantizedWeight
from ...layers import QuantLinear
from ..compressors import dense_proxy, dense_weight
from ..hooks import BlockHooks
from ..stage import register
from .grid import max_code


class BlockTuneStage(BaseModel):
    """Tune each block's rounding offsets, group scales and zeros on the block's output MSE."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    kind: ClassVar[str] = "tuning"
    needs: ClassVar[frozenset[str]] = frozenset({"activations"})

    method: Literal["block-tune"] = "block-tune"
    steps: int = Field(40, ge=0)                # the most that keeps W3 within 3x GPTQ's time (2-core CPU)
    batch: int = Field(1, ge=1)                 # calibration windows per step
    lr: float = Field(0.005, gt=0)              # SignRound's 1/200 (a step moves each offset by lr)
    optimizer: Literal["sign", "adam", "scaled"] = "sign"
    # linear: the step size falls linearly from lr to 0 over the steps (auto-round's LinearLR)
    lr_schedule: Literal["constant", "linear"] = "constant"
    scale_range: float = Field(0.1, ge=0, lt=1)   # α ∈ [1 − r, 1 + r]
    holdout: int = Field(4, ge=1)               # calibration windows held out for early stopping
    eval_every: int = Field(16, ge=1)
    # the steps' forward and backward passes (bf16 autocast; auto: bf16 where the hardware computes it
    # natively, CPUs with AMX or AVX512-BF16 and CUDA); the teacher and the held-out error stay fp32
    step_dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    # the target's inputs: the compressed model's stream into the block (the teacher is the original
    # block on the inputs the tuned one sees: its own error only), or the full-precision model's
    # stream (auto-round's reference: the error that came in from the blocks before is corrected too)
    teacher_inputs: Literal["compressed", "full-precision"] = "compressed"
    seed: int = 0

    @property
    def label(self) -> str:
        return "block-tune"


class _GridWeight(torch.autograd.Function):
    """``s·α·(clamp(⌊c + v⌉) − clamp(⌊z + β⌉))`` with ``s·α`` rounded to fp16, group-major, each
    rounding passing the gradient straight through (zero where the clamp is active). One function
    with its gradients written out: built from autograd's elementwise ops, the weight takes several
    more passes over the ``[out, in]`` tensors, which under bf16 autocast cost more than the step's
    matrix products."""

    @staticmethod
    def forward(ctx, codes, offset, scales, factor, zeros, shift, qmax: int):
        rounded, z, s = _rounded_grid(codes, offset, scales, factor, zeros, shift)
        q = rounded.clamp(0, qmax)
        inside_z = (z >= 0) & (z <= qmax)
        z = z.clamp(0, qmax)
        level = q - z.unsqueeze(-1)
        ctx.save_for_backward(level, (rounded >= 0) & (rounded <= qmax), inside_z, s, scales)
        return s.unsqueeze(-1) * level

    @staticmethod
    def backward(ctx, grad):
        level, inside_q, inside_z, s, scales = ctx.saved_tensors
        grad = grad.to(torch.float32)
        d_offset = grad * s.unsqueeze(-1) * inside_q if ctx.needs_input_grad[1] else None
        d_factor = (grad * level).sum(-1) * scales if ctx.needs_input_grad[3] else None
        d_shift = -grad.sum(-1) * s * inside_z if ctx.needs_input_grad[5] else None
        return None, d_offset, None, d_factor, None, d_shift, None


def _rounded_grid(codes, offset, scales, factor, zeros, shift) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tuned state as stored: rounded codes and zeros (before the grid's clamp), fp16 scales."""
    return torch.round(codes + offset), torch.round(zeros + shift), (scales * factor).to(torch.float16).to(torch.float32)


def step_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype of the tuning steps: ``auto`` is bf16 where it is computed natively."""
    if setting != "auto":
        return getattr(torch, setting)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return torch.bfloat16 if device.type == "cpu" and native else torch.float32


class TunableUniform(nn.Module):
    """A :class:`QuantLinear`'s grid made differentiable: codes + offsets, scales × factors, zeros
    + shifts; :meth:`export` packs the tuned state in the same format.

    Everything is held group-major, ``[out, groups, width]`` (act-order's columns sorted by group,
    a ragged last group padded), so a group's scale and zero broadcast over its codes: gathering
    them per column instead costs an accumulating scatter in every backward pass, about a quarter
    of a step's time. One column selection per step puts the weight back in the layer's column order.
    """

    def __init__(self, layer: QuantLinear, scale_range: float):
        super().__init__()
        self.layer, self.scale_range = layer, scale_range
        self.qmax = max_code(layer.bits)
        codes = unpack_codes(layer.qweight, layer.bits, layer.in_features).to(torch.float32)
        zeros = unpack_codes(layer.qzeros, layer.bits, layer.n_groups).to(torch.float32)
        group = QuantizedWeight(codes, layer.scales, zeros, layer.g_idx if layer.has_g_idx else None,
                                layer.bits, layer.group_size, layer.sym).group_of_column()
        width = int(torch.bincount(group, minlength=layer.n_groups).max())
        order = torch.argsort(group, stable=True)   # columns by group
        rank = torch.empty_like(order)               # a column's place within its group
        rank[order] = torch.arange(len(order)) - torch.searchsorted(group[order], group[order])
        slot = group * width + rank                  # a column's place in the group-major layout
        in_order = layer.n_groups * width == len(slot) and torch.equal(slot, torch.arange(len(slot)))
        self.register_buffer("slot", None if in_order else slot)
        held = torch.zeros(layer.out_features, layer.n_groups * width)
        held[:, slot] = codes
        self.register_buffer("codes", held.view(layer.out_features, layer.n_groups, width))
        self.register_buffer("scales", layer.scales.to(torch.float32))
        self.register_buffer("zeros", zeros)
        self.bias = None if layer.bias is None else layer.bias.detach().to(torch.float32)
        self.offset = nn.Parameter(torch.zeros_like(self.codes))
        self.factor = nn.Parameter(torch.ones_like(self.scales))
        self.shift = nn.Parameter(torch.zeros_like(self.scales), requires_grad=not layer.sym)

    def clamp_(self) -> None:
        with torch.no_grad():
            self.offset.clamp_(-1.0, 1.0)
            self.factor.clamp_(1 - self.scale_range, 1 + self.scale_range)
            self.shift.clamp_(-1.0, 1.0)

    def _columns(self, held: torch.Tensor) -> torch.Tensor:
        """A group-major ``[out, groups, width]`` tensor in the layer's ``[out, in]`` column order."""
        flat = held.reshape(held.shape[0], -1)
        return flat if self.slot is None else flat.index_select(1, self.slot)

    def weight(self) -> torch.Tensor:
        return self._columns(_GridWeight.apply(self.codes, self.offset, self.scales, self.factor, self.zeros,
                                               self.shift, self.qmax))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.device, x.dtype)
        return nn.functional.linear(x, self.weight().to(x.dtype), bias)

    @torch.no_grad()
    def export(self) -> QuantLinear:
        codes, zeros, scales = _rounded_grid(self.codes, self.offset, self.scales, self.factor, self.zeros, self.shift)
        codes, zeros = codes.clamp(0, self.qmax), zeros.clamp(0, self.qmax)
        layer = self.layer
        q = QuantizedWeight(self._columns(codes).to(torch.int64), scales, zeros.to(torch.int64),
                            layer.g_idx if layer.has_g_idx else None, layer.bits, layer.group_size, layer.sym)
        return QuantLinear.from_quantized(q, layer.bias, layer.compute_dtype)

    def state(self) -> tuple[torch.Tensor, ...]:
        return tuple(p.detach().clone() for p in (self.offset, self.factor, self.shift))

    @torch.no_grad()
    def load(self, state: tuple[torch.Tensor, ...]) -> None:
        for p, s in zip((self.offset, self.factor, self.shift), state):
            p.copy_(s)


def window_batch(kwargs: tuple[tuple, dict], start: int, stop: int, windows: int) -> tuple[tuple, dict]:
    """A calibration batch's block arguments for windows ``start:stop`` of its ``windows``: each
    tensor whose first dimension is the batch's is sliced (masks, per-window rotary tables), the
    rest (shared rotary tables of batch 1, flags) passed as they are."""
    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == windows and windows > 1:
            return value[start:stop]
        if isinstance(value, tuple):
            return tuple(cut(v) for v in value)
        return value

    args, kw = kwargs
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kw.items()}


Window = tuple[int, int, int]   # (calibration batch, index in it, windows in it)


class BlockTuning(BlockHooks):
    """The stage at the block's hook points: the full-precision block's outputs at the start (for
    the windows the tuning will use: its steps are drawn then), the tuning after the last group is
    solved, before the block's outputs are computed from it."""

    @classmethod
    def needs_full_precision_stream(cls, stage) -> bool:
        return stage.teacher_inputs == "full-precision"

    @classmethod
    def check(cls, stage, plan, arch) -> None:
        from .. import distributed

        if distributed.active():   # each rank would tune on its own windows and the ranks would part
            raise LlmpressError("block-tune does not run under torchrun yet; run it in one process")
        assigned = [a for a in plan.assignment.values() if a is not None]
        if assigned and not any(_uniform(a) for a in assigned):
            methods = ", ".join(sorted({a.method for a in assigned}))
            raise LlmpressError(f"block-tune tunes uniform grids (RTN, GPTQ, GPTAQ); this block's linears are "
                                f"compressed with {methods} only")

    def __init__(self, stage: BlockTuneStage):
        super().__init__(stage)
        self.teacher: dict[Window, torch.Tensor] = {}
        self.schedule: list[list[Window]] = []
        self.held_out: list[Window] = []
        self.last_group: tuple[str, ...] | None = None

    def keeps_output_shortcut(self, ctx, members) -> bool:
        return False   # the outputs must come from the tuned weights

    def keeps_attention_cache(self, ctx) -> bool:
        return False   # the tuning runs the real attention with its tunable output linear

    @torch.no_grad()
    def start(self, ctx) -> None:
        plan, stage = ctx.plan, self.stage   # the last group that compresses something: the hook point
        self.last_group = next((g for g in reversed(plan.groups) if any(plan.assignment[n] for n in g)), None)
        if ctx.hidden is None or ctx.kwargs is None:
            raise LlmpressError("block-tune needs calibration data")
        windows = _windows(ctx.hidden.shape[0], ctx.batch_size)
        if len(windows) <= stage.holdout:
            raise LlmpressError(f"block-tune holds out {stage.holdout} calibration windows and needs more than that")
        train, self.held_out = windows[:-stage.holdout], windows[-stage.holdout:]
        generator = torch.Generator().manual_seed(stage.seed + ctx.index)
        self.schedule = []
        for _ in range(stage.steps):   # a step: `batch` consecutive windows of one calibration batch
            first = train[int(torch.randint(len(train), (1,), generator=generator))]
            self.schedule.append([w for w in train if w[0] == first[0] and first[1] <= w[1] < first[1] + stage.batch])
        needed = sorted({w for step in self.schedule for w in step} | set(self.held_out))
        if stage.teacher_inputs == "full-precision":   # computed already, by the full-precision stream
            self.teacher = {w: ctx.fp_outputs[w[0] * ctx.batch_size + w[1]][None].to(ctx.device, copy=True)
                            for w in needed}
            return
        ctx.describe(f"block {ctx.index + 1} · block-tune: full-precision outputs")
        self.teacher = {w: self._run(ctx, [w]).to(ctx.hidden.dtype) for w in needed}   # on the block's device

    def after_group(self, ctx, group) -> None:
        if group != self.last_group:
            return
        names = [n for n, m in ctx.modules.items() if isinstance(m, QuantLinear)]
        if not names or self.stage.steps == 0:
            return
        start = time.perf_counter()
        tunables = {n: TunableUniform(ctx.modules[n], self.stage.scale_range).to(ctx.device) for n in names}
        for n, t in tunables.items():
            ctx.block.set_submodule(n, t)
        try:
            first, best, best_step = self._tune(ctx, tunables)
        finally:
            self.teacher = {}
            for n, t in tunables.items():   # the tuned modules, stored and computed with from here on
                module = t.to("cpu").export()
                ctx.modules[n] = module
                ctx.block.set_submodule(n, dense_proxy(module, dense_weight(module), ctx.device))
        seconds = time.perf_counter() - start
        for n in names:   # (the block's records hold these very dicts)
            ctx.metrics[n].update({"tune_start": first, "tune_best": best, "tune_best_step": best_step,
                                   "tune_seconds": seconds / len(names)})

    @staticmethod
    def _run(ctx, windows: list[Window]) -> torch.Tensor:
        """The block's output on ``windows`` (consecutive windows of one calibration batch)."""
        b, size = windows[0][0], windows[0][2]
        lo, hi = windows[0][1], windows[-1][1] + 1
        s = b * ctx.batch_size
        args, kw = window_batch(ctx.kwargs[b], lo, hi, size)
        out = ctx.block(ctx.hidden[s + lo:s + hi].to(ctx.device, torch.float32), *args, **kw)
        return out[0] if isinstance(out, tuple) else out

    def _error(self, ctx, windows: list[Window]) -> torch.Tensor:
        out = self._run(ctx, windows).to(torch.float32)
        target = torch.cat([self.teacher[w] for w in windows]).to(torch.float32)
        return (out - target).pow(2).mean()

    @torch.no_grad()
    def _held_out_error(self, ctx) -> float:
        return sum(float(self._error(ctx, [w])) for w in self.held_out) / len(self.held_out)

    def _tune(self, ctx, tunables: dict[str, TunableUniform]) -> tuple[float, float, int]:
        stage = self.stage
        frozen = [p for p in ctx.block.parameters() if p.requires_grad and not _is_tunable(p, tunables)]
        for p in frozen:
            p.requires_grad_(False)
        if not offsets_can_move(stage):   # an exact saving: no offset could reach a rounding boundary
            for t in tunables.values():
                t.offset.requires_grad_(False)
        params = [p for t in tunables.values() for p in (t.offset, t.factor, t.shift) if p.requires_grad]
        adam = torch.optim.Adam(params, lr=stage.lr) if stage.optimizer == "adam" else None
        device = ctx.device
        dtype = step_dtype(stage.step_dtype, device)
        first = best = self._held_out_error(ctx)
        best_state = {n: t.state() for n, t in tunables.items()}
        best_step = 0
        try:
            for step, windows in enumerate(self.schedule, start=1):
                ctx.describe(f"block {ctx.index + 1} · block-tune step {step}/{stage.steps} · "
                             f"held-out mse {best / first:.3f} of the start")
                with torch.enable_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    self._error(ctx, windows).backward()
                with torch.no_grad():
                    _update(params, stage, adam, step_lr(stage, step))
                    for t in tunables.values():
                        t.clamp_()
                if step % stage.eval_every == 0 or step == stage.steps:
                    current = self._held_out_error(ctx)
                    if current < best:
                        best, best_step = current, step
                        best_state = {n: t.state() for n, t in tunables.items()}
        finally:
            for n, t in tunables.items():
                t.load(best_state[n])
            for p in frozen:
                p.requires_grad_(True)
        return first, best, best_step


def _windows(n: int, batch_size: int) -> list[Window]:
    """Every calibration window of ``n`` as ``(batch, index in batch, windows in batch)``."""
    return [(b, i, min(batch_size, n - s)) for b, s in enumerate(range(0, n, batch_size))
            for i in range(min(batch_size, n - s))]


def step_lr(stage: BlockTuneStage, step: int) -> float:
    """The step size of step ``step`` (1-based): ``lr``, or under the linear schedule ``lr·(1 − (step − 1)/steps)``."""
    if stage.lr_schedule == "constant":
        return stage.lr
    return stage.lr * (1 - (step - 1) / max(stage.steps, 1))


def _update(params: list[torch.Tensor], stage: BlockTuneStage, adam, lr: float) -> None:
    """One step of the stage's optimiser at step size ``lr``; the gradients are cleared."""
    if adam is not None:
        for group in adam.param_groups:
            group["lr"] = lr
        adam.step()
    for p in params:
        if p.grad is None:
            continue
        if stage.optimizer == "sign":
            p.sub_(lr * p.grad.sign())
        elif stage.optimizer == "scaled":   # each tensor's largest gradient moves it by lr
            p.sub_(lr * p.grad / p.grad.abs().max().clamp_min(1e-30))
        p.grad = None


def offsets_can_move(stage: BlockTuneStage) -> bool:
    """Whether a rounding offset can change a code: signed descent moves one by the step size a
    step (``lr``, or less under the linear schedule), and a code changes once its offset passes ±0.5."""
    return stage.optimizer != "sign" or sum(step_lr(stage, k) for k in range(1, stage.steps + 1)) >= 0.5


def _is_tunable(p: torch.Tensor, tunables: dict[str, TunableUniform]) -> bool:
    return any(p is q for t in tunables.values() for q in (t.offset, t.factor, t.shift))


def _uniform(stage) -> bool:
    return getattr(stage, "codes_on_own_grid", False) and stage.grid == "uniform"


register(BlockTuneStage, hooks=BlockTuning)
