"""Block-wise output tuning (SignRound's step, after any uniform quantizer).

Once every linear of a block is quantized (RTN, GPTQ, GPTAQ, rotated or not), the rounding and the
grid are tuned so that the *block's output* matches the full-precision block's on calibration data:

    Ŵ = s·α · (clamp(⌊c + v⌉, 0, 2^b − 1) − ⌊z + β⌉)

with ``c``, ``s``, ``z`` the starting quantizer's codes, fp16 scales and integer zeros, a rounding
offset ``v ∈ [−1, 1]`` per weight, a scale factor ``α ∈ [1 − r, 1 + r]`` and a zero shift
``β ∈ [−1, 1]`` per group (no zero shift on a symmetric grid), ``⌊·⌉`` rounded with a
straight-through gradient. At ``v = 0, α = 1, β = 0`` it is the starting point exactly. The loss is
the mean squared error between the block's output and the full-precision block's output on the
same inputs (the compressed model's stream into this block), minimised with signed gradient
descent (SignRound's optimiser; ``optimizer: adam`` for Adam) over ``steps`` steps of ``batch``
windows; every ``eval_every`` steps the loss on held-out windows (the last ``holdout`` calibration
windows, never trained on) is measured, and the best state seen, the starting point
included, is what is kept. The result is stored in the starting quantizer's own packed format.

Departures from SignRound, all for a CPU budget or for starting from GPTQ: SignRound rounds the
full-precision weight (``⌊W/s + v⌉``, ``v ∈ [−0.5, 0.5]``), which starts from round-to-nearest;
starting from GPTQ's codes, which are integers already, a bound of ±0.5 could never change one, so
``v`` moves a code by at most one step either way. SignRound tunes min/max clipping factors in
[0.5, 1]; here the scale and the (integer) zero are tuned directly. Its defaults are 200 steps of 8
windows of 2048 tokens; ours 64 steps of one calibration window (2-core CPU).
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
    steps: int = Field(64, ge=0)
    batch: int = Field(1, ge=1)                 # calibration windows per step
    lr: float = Field(0.005, gt=0)              # SignRound's 1/200 (a step moves each offset by lr)
    optimizer: Literal["sign", "adam", "scaled"] = "sign"
    scale_range: float = Field(0.1, ge=0, lt=1)   # α ∈ [1 − r, 1 + r]
    holdout: int = Field(4, ge=1)               # calibration windows held out for early stopping
    eval_every: int = Field(16, ge=1)
    seed: int = 0

    @property
    def label(self) -> str:
        return "block-tune"


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _ste_half(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to fp16 (what a stored scale is), with a straight-through gradient."""
    return x + (x.to(torch.float16).to(torch.float32) - x).detach()


class TunableUniform(nn.Module):
    """A :class:`QuantLinear`'s grid made differentiable: codes + offsets, scales × factors, zeros
    + shifts; :meth:`export` packs the tuned state in the same format."""

    def __init__(self, layer: QuantLinear, scale_range: float):
        super().__init__()
        self.layer, self.scale_range = layer, scale_range
        self.qmax = max_code(layer.bits)
        self.register_buffer("codes", unpack_codes(layer.qweight, layer.bits, layer.in_features).to(torch.float32))
        self.register_buffer("scales", layer.scales.to(torch.float32))
        self.register_buffer("zeros", unpack_codes(layer.qzeros, layer.bits, layer.n_groups).to(torch.float32))
        q = QuantizedWeight(self.codes, self.scales, self.zeros, layer.g_idx if layer.has_g_idx else None,
                            layer.bits, layer.group_size, layer.sym)
        self.register_buffer("cols", q.group_of_column())
        self.bias = None if layer.bias is None else layer.bias.detach().to(torch.float32)
        self.offset = nn.Parameter(torch.zeros_like(self.codes))
        self.factor = nn.Parameter(torch.ones_like(self.scales))
        self.shift = nn.Parameter(torch.zeros_like(self.scales), requires_grad=not layer.sym)

    def clamp_(self) -> None:
        with torch.no_grad():
            self.offset.clamp_(-1.0, 1.0)
            self.factor.clamp_(1 - self.scale_range, 1 + self.scale_range)
            self.shift.clamp_(-1.0, 1.0)

    def _grid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes = torch.clamp(_ste_round(self.codes + self.offset), 0, self.qmax)
        zeros = torch.clamp(_ste_round(self.zeros + self.shift), 0, self.qmax)
        return codes, _ste_half(self.scales * self.factor), zeros

    def weight(self) -> torch.Tensor:
        codes, scales, zeros = self._grid()
        return scales[:, self.cols] * (codes - zeros[:, self.cols])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def export(self) -> QuantLinear:
        codes, scales, zeros = self._grid()
        layer = self.layer
        q = QuantizedWeight(codes.to(torch.int64), scales, zeros.to(torch.int64),
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
    def check(cls, stage, plan, arch) -> None:
        from .. import distributed

        if distributed.active():   # each rank would tune on its own windows and the ranks would part
            raise LlmpressError("block-tune does not run under torchrun yet; run it in one process")
        for name, assigned in plan.assignment.items():
            if assigned is not None and not _uniform(assigned):
                raise LlmpressError(f"block-tune tunes uniform grids (RTN, GPTQ, GPTAQ); {name} is compressed with "
                                    f"{assigned.method}")

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
        ctx.describe(f"block {ctx.index + 1} · block-tune: full-precision outputs")
        needed = sorted({w for step in self.schedule for w in step} | set(self.held_out))
        self.teacher = {w: self._run(ctx, [w]).to(ctx.hidden.dtype) for w in needed}

    def after_group(self, ctx, group) -> None:
        if group != self.last_group:
            return
        names = [n for n, m in ctx.modules.items() if isinstance(m, QuantLinear)]
        if not names or self.stage.steps == 0:
            return
        start = time.perf_counter()
        tunables = {n: TunableUniform(ctx.modules[n], self.stage.scale_range) for n in names}
        for n, t in tunables.items():
            ctx.block.set_submodule(n, t)
        try:
            first, best, best_step = self._tune(ctx, tunables)
        finally:
            self.teacher = {}
            for n, t in tunables.items():   # the tuned modules, stored and computed with from here on
                module = t.export()
                ctx.modules[n] = module
                ctx.block.set_submodule(n, dense_proxy(module, dense_weight(module)))
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
        out = ctx.block(ctx.hidden[s + lo:s + hi].to(torch.float32), *args, **kw)
        return out[0] if isinstance(out, tuple) else out

    def _error(self, ctx, windows: list[Window]) -> torch.Tensor:
        out = self._run(ctx, windows)
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
        params = [p for t in tunables.values() for p in (t.offset, t.factor, t.shift) if p.requires_grad]
        adam = torch.optim.Adam(params, lr=stage.lr) if stage.optimizer == "adam" else None
        first = best = self._held_out_error(ctx)
        best_state = {n: t.state() for n, t in tunables.items()}
        best_step = 0
        try:
            for step, windows in enumerate(self.schedule, start=1):
                ctx.describe(f"block {ctx.index + 1} · block-tune step {step}/{stage.steps} · "
                             f"held-out mse {best / first:.3f} of the start")
                with torch.enable_grad():
                    self._error(ctx, windows).backward()
                with torch.no_grad():
                    _update(params, stage, adam)
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


def _update(params: list[torch.Tensor], stage: BlockTuneStage, adam) -> None:
    """One step of the stage's optimiser; the gradients are cleared."""
    if adam is not None:
        adam.step()
    for p in params:
        if p.grad is None:
            continue
        if stage.optimizer == "sign":
            p.sub_(stage.lr * p.grad.sign())
        elif stage.optimizer == "scaled":   # each tensor's largest gradient moves it by lr
            p.sub_(stage.lr * p.grad / p.grad.abs().max().clamp_min(1e-30))
        p.grad = None


def _is_tunable(p: torch.Tensor, tunables: dict[str, TunableUniform]) -> bool:
    return any(p is q for t in tunables.values() for q in (t.offset, t.factor, t.shift))


def _uniform(stage) -> bool:
    return getattr(stage, "codes_on_own_grid", False) and stage.grid == "uniform"


register(BlockTuneStage, hooks=BlockTuning)
