"""HARP as the paper builds it: a learned two-sided processor for every linear (arXiv 2605.29843).

For a linear ``W`` (``m × n``) with input Hessian ``H``: ``Q_in`` (``n × n``) and ``Q_out``
(``m × m``) are mixed-radix butterflies (``formats.butterfly``), sign flips included, starting at
the randomized Hadamard (``Θ = 0``). They are fitted on the paper's proxy

    ``L = Σ_ij h̃_j (W̃_ij − T_ij)² / Σ_ij h̃⁰_j W̃⁰_ij²``,  ``W̃ = Q_outᵀ W Q_in``,

``h̃`` the diagonal of ``Q_inᵀ H Q_in`` over its mean and ``T`` the RTN output of the linear's own
grid on ``W̃``, both held fixed (stop-gradient) between refreshes; Adam on the skew parameters;
the best ``Θ`` seen at a refresh is kept, so the proxy never ends above its start. The layer
method then solves ``W̃`` on ``H̃ = Q_inᵀ H Q_in`` (GPTQ's ``Vᵀ H V``) and the result is stored as
a :class:`~llmpress.layers.HarpLinear`, which applies both processors online.

Linears that read one input (q/k/v, gate/up) share ``Q_in``, fitted on the sum of their proxies,
as the reference fits their fused matrix; each keeps its own ``Q_out`` (docs/methods/harp.md).
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ...devices import to_device
from ...errors import RecipeError
from ...formats.butterfly import apply_butterfly, butterfly_stages, compose_stages, skew_entries, stage_blocks
from ...layers.harp_linear import THETA_DTYPE, ButterflyMap, HarpLinear, learned_stages
from ..compressors import linear_weight
from ..hooks import BlockContext, BlockHooks, LinearProcessor
from ..phases import phase
from ..quant.grid import grouped_fake_quantize
from ..stage import UniformQuantStage, method_of
from .hadamard import random_signs


def processor_seed(seed: int, name: str) -> int:
    """The sign seed of one processor: the stage's seed and the linear's (or input's) name."""
    return zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFFFFFF


class TrainableButterfly(nn.Module):
    """A processor under fit: fp32 skew parameters for the learned stages, the rest fixed. The
    fixed stages all apply before the learned ones (``formats.butterfly``), so a fit applies
    the signs and fixed stages to a weight once (``prefix``) and only the learned ones per step."""

    def __init__(self, n: int, seed: int, *, fixed_odd: bool):
        super().__init__()
        self.n = n
        stages = butterfly_stages(n)
        self.mixers, self.strides = [m for m, _ in stages], [st for _, st in stages]
        self.learned = learned_stages(n, fixed_odd)
        self.first_learned = self.learned[0] if self.learned else len(stages)
        if any(t not in self.learned for t in range(self.first_learned, len(stages))):
            raise ValueError(f"width {n}: a fixed stage follows a learned one")
        self.register_buffer("signs", random_signs(n, seed).to(torch.float32))
        self.thetas = nn.ParameterDict({
            str(t): nn.Parameter(torch.zeros(n // self.mixers[t].shape[0], skew_entries(self.mixers[t].shape[0])))
            for t in self.learned
        })

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """``x · diag(s) · (fixed stages)``."""
        k = self.first_learned
        return apply_butterfly(x, self.signs, [m.to(x.device, torch.float32) for m in self.mixers[:k]], self.strides[:k])

    def learned_blocks(self) -> tuple[list[torch.Tensor], list[int]]:
        """The learned stages multiplied out into as few stages as ``compose_stages`` makes."""
        blocks = [stage_blocks(self.mixers[t], self.thetas[str(t)]) for t in self.learned]
        return compose_stages(blocks, self.strides[self.first_learned:], self.n)

    def learned_part(self, x: torch.Tensor, blocks: tuple[list[torch.Tensor], list[int]] | None = None) -> torch.Tensor:
        """``x · (learned stages)``, differentiable in their parameters."""
        return apply_butterfly(x, None, *(blocks or self.learned_blocks()))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.learned_part(self.prefix(x))

    def stored(self) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The signs and the parameters as the layer stores them (fp16, on the CPU)."""
        return self.signs.to("cpu", copy=True), {int(t): p.detach().to("cpu", THETA_DTYPE) for t, p in self.thetas.items()}


def rotated_hessian_diagonal(v: TrainableButterfly, fixed_hessian: torch.Tensor,
                             blocks: tuple[list[torch.Tensor], list[int]]) -> torch.Tensor:
    """``diag(Qᵀ H Q)`` from ``PᵀHP`` (``P`` the signs and fixed stages of ``Q = P·L``) and the
    learned part's ``blocks``. With ``L`` one block-diagonal stage (the usual case) only the
    diagonal blocks of ``PᵀHP`` are read: ``n·b²`` instead of ``2·n²·b`` operations."""
    n = v.n
    stages, strides = blocks
    if len(stages) == 1 and strides[0] == 1:
        k = stages[0]
        b = k.shape[-1]
        diag = fixed_hessian.reshape(n // b, b, n // b, b).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        return (torch.bmm(diag, k) * k).sum(1).reshape(n)
    eye = torch.eye(n, dtype=fixed_hessian.dtype, device=fixed_hessian.device)
    return (v.learned_part(fixed_hessian, blocks) * v.learned_part(eye, blocks)).sum(0)


@dataclass
class ProcessorFit:
    """One input's fitted processors: ``Q_in`` and each reader's ``Q_out``, as stored."""

    input: tuple[torch.Tensor, dict[int, torch.Tensor]]
    outputs: dict[str, tuple[torch.Tensor, dict[int, torch.Tensor]]]
    initial: float
    final: float
    seconds: float
    history: list[tuple[int, float]] = field(default_factory=list)


def fit_processors(weights: dict[str, torch.Tensor], hessian: torch.Tensor,
                   grids: dict[str, tuple[int, int, bool]], *, seeds: dict[str, int], input_seed: int,
                   steps: int, lr: float, refresh: int, fixed_odd: bool) -> ProcessorFit:
    """Fit ``Q_in`` (shared by the linears of ``weights``, all reading the input of ``hessian``) and
    one ``Q_out`` per linear on the proxy; ``grids[name]`` is ``(bits, group_size, sym)``. The fit
    runs where the Hessian is; the stored processors come back on the CPU."""
    start = time.perf_counter()
    n, device = hessian.shape[0], hessian.device
    hessian = hessian.to(torch.float32)
    v = TrainableButterfly(n, input_seed, fixed_odd=fixed_odd).to(device)
    us = {name: TrainableButterfly(w.shape[0], seeds[name], fixed_odd=fixed_odd).to(device)
          for name, w in weights.items()}
    params = [*v.parameters(), *(p for u in us.values() for p in u.parameters())]
    opt = torch.optim.Adam(params, lr=lr) if params else None
    with torch.no_grad():   # the signs and fixed stages of both sides, applied once
        fixed = {name: us[name].prefix(v.prefix(w.to(device, torch.float32)).T).T.contiguous()
                 for name, w in weights.items()}

    def rotated(v_blocks) -> dict[str, torch.Tensor]:
        """``W̃ = Q_outᵀ W Q_in`` of every linear."""
        return {name: us[name].learned_part(v.learned_part(w, v_blocks).T).T for name, w in fixed.items()}

    with torch.no_grad():
        hessian_fixed = v.prefix(v.prefix(hessian).T)        # Pᵀ H P, P the fixed part of Q_in

    def column_weights(v_blocks) -> torch.Tensor:
        h = rotated_hessian_diagonal(v, hessian_fixed, v_blocks)
        return h / h.mean().clamp_min(1e-12)

    # Each step's forward at the current Θ also serves the refresh due at it: the targets and
    # weights are taken from it, and its proxy against them is that Θ's value for keeping the best.
    den = best = float("inf")
    best_state: list[torch.Tensor] = []
    history: list[tuple[int, float]] = []
    h = targets = None
    for step in range(steps + 1):
        with torch.set_grad_enabled(step < steps and opt is not None):
            v_blocks = v.learned_blocks()
            now = rotated(v_blocks)
        if step % refresh == 0 or step == steps:
            with torch.no_grad():
                h = column_weights(([b.detach() for b in v_blocks[0]], v_blocks[1]))
                targets = {name: grouped_fake_quantize(w.detach(), *grids[name]) for name, w in now.items()}
                if step == 0:
                    den = max(sum(float((w.detach().pow(2) * h).sum()) for w in now.values()), 1e-30)
                value = sum(float(((now[k].detach() - targets[k]).pow(2) * h).sum()) for k in now) / den
            history.append((step, value))
            if value < best:
                best, best_state = value, [p.detach().clone() for p in params]
        if step == steps or opt is None:
            break
        loss = sum(((now[k] - targets[k]).pow(2) * h).sum() for k in now) / den
        opt.zero_grad()
        loss.backward()
        opt.step()
    initial = history[0][1]
    with torch.no_grad():
        for p, b in zip(params, best_state, strict=True):
            p.copy_(b)
    return ProcessorFit(input=v.stored(), outputs={name: u.stored() for name, u in us.items()},
                        initial=initial, final=best, seconds=time.perf_counter() - start, history=history)


# -- the processed problem and the stored layer ---------------------------------------------------

def _maps(fit: ProcessorFit, name: str, shape: tuple[int, int], fixed_odd: bool):
    """The stored processors of ``name`` as the layer applies them (the fp16 parameters)."""
    m, n = shape
    maps = []
    for width, (signs, thetas) in ((n, fit.input), (m, fit.outputs[name])):
        bm = ButterflyMap(width, fixed_odd=fixed_odd)
        bm.load_parameters(signs, thetas)
        maps.append(bm)
    return maps


@torch.no_grad()
def rotate_problem(weight: torch.Tensor, stats: dict, q_in, q_out) -> tuple[torch.Tensor, dict]:
    """``W̃ = Q_outᵀ W Q_in`` and the statistics in ``Q_in``'s basis (``Q_inᵀ A Q_in`` for every
    input-space matrix: the Hessian, GPTAQ's cross term), from the stored processors (float64)."""
    def both_sides(a: torch.Tensor) -> torch.Tensor:
        a = q_in.apply(a.double())                            # A Q
        return q_in.apply(a.T.contiguous()).T.contiguous()    # Qᵀ A Q

    w = q_in.apply(weight.double())                                          # W Q_in
    w = q_out.apply(w.T.contiguous()).T.contiguous().to(torch.float32)      # Q_outᵀ W Q_in
    out = dict(stats)
    if "hessian" in stats:
        h = both_sides(stats["hessian"])
        out["hessian"] = ((h + h.T) / 2).to(torch.float32)
    if "cross" in stats:
        out["cross"] = both_sides(stats["cross"]).to(stats["cross"].dtype)
    return w, out


def wrap(module: nn.Module, bias: torch.Tensor | None, q_in, q_out, fixed_odd: bool, dtype: torch.dtype) -> HarpLinear:
    """The stored layer: ``module`` (solved in the rotated bases, without bias) between the processors."""
    layer = HarpLinear(module.in_features, module.out_features, inner=module, bias=bias is not None,
                       fixed_odd=fixed_odd, dtype=dtype)
    layer.input.load_parameters(q_in.signs, q_in.thetas())
    layer.output.load_parameters(q_out.signs, q_out.thetas())
    if bias is not None:
        layer.bias.copy_(bias.detach().to(dtype))
    return layer


# -- the method's block hooks --------------------------------------------------------------------

class PerLinearProcessors(BlockHooks):
    """Per-linear HARP at the executor's hook point between a group's statistics and its solves:
    fit the processors of each set of linears that read one input, and hand each linear its
    rotated problem and the wrapper of its stored layer."""

    @classmethod
    def check(cls, stage, plan, arch) -> None:
        if stage.variant != "per-linear":
            return
        for name, s in plan.assignment.items():
            if s is None:
                continue
            if (not isinstance(s, UniformQuantStage) or getattr(s, "grid", "uniform") != "uniform"
                    or method_of(s).hooks is not None):
                raise RecipeError(f"per-linear HARP fits its processors to a uniform grid solved on one linear; "
                                  f"{name} is compressed by `{s.method}`, which is not such a quantizer "
                                  "(use `variant: shared`, or leave that linear out with `ignore`)")

    @classmethod
    def linear_needs(cls, stage) -> frozenset[str]:
        return frozenset({"hessian"}) if stage.variant == "per-linear" else frozenset()

    def processors(self, ctx: BlockContext, stats: dict[str, dict]) -> dict[str, LinearProcessor]:
        stage = self.stage
        if stage.variant != "per-linear":
            return {}
        readers: dict[int, list[str]] = {}   # the statistics give one Hessian object per input
        for name, s in stats.items():
            if "hessian" in s and ctx.plan.assignment.get(name) is not None:
                readers.setdefault(id(s["hessian"]), []).append(name)
        out: dict[str, LinearProcessor] = {}
        for names in readers.values():
            ctx.describe(f"block {ctx.index + 1} · HARP fit · {', '.join(names)}")
            weights = {n: linear_weight(ctx.block.get_submodule(n)) for n in names}
            grids = {}
            for n in names:
                s = ctx.plan.assignment[n]
                grids[n] = (s.bits, s.group_size, s.sym)
            with phase("HARP fit"):
                fit = fit_processors(weights, stats[names[0]]["hessian"], grids,
                                     seeds={n: processor_seed(stage.seed, f"{ctx.prefix}.{n}") for n in names},
                                     input_seed=processor_seed(stage.seed, f"{ctx.prefix}.{names[0]}:input"),
                                     steps=stage.steps, lr=stage.lr, refresh=stage.refresh, fixed_odd=stage.fixed_odd)
            metrics = {"harp_proxy_start": fit.initial, "harp_proxy_end": fit.final,
                       "harp_seconds": fit.seconds / len(names)}
            cpu = torch.device("cpu")   # the stored processors are CPU modules: the problem is rotated there
            for n in names:
                q_in, q_out = _maps(fit, n, tuple(weights[n].shape), stage.fixed_odd)
                weight, rotated = rotate_problem(weights[n].to(cpu), to_device(stats[n], cpu), q_in, q_out)
                out[n] = LinearProcessor(
                    weight=weight, stats=rotated, metrics=metrics,
                    wrap=lambda module, bias, dtype, q_in=q_in, q_out=q_out: wrap(module, bias, q_in, q_out,
                                                                                  stage.fixed_odd, dtype))
        return out
