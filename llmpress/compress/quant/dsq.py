"""D²Quant's dual-scale quantizer (DSQ) for ``down_proj``: the method, its defaults and where it
departs from the paper are in docs/methods/d2quant.md.

Binary form: per group of input columns ``W[i, j] ≈ c_j · Σ_t r_t[i, g] · b_t[i, j]`` (``b_t = ±1``),
a column quantizer in GPTQ's loop (``_DualScaleGrid``). Uniform form: the standard grid on
``W·diag(1/c)``, solved against the scaled inputs' statistics. Either way ``c`` multiplies
``down_proj``'s inputs, so a block hook absorbs it into ``up_proj`` (``ColumnScaleAbsorption``).
Columns go in the reference's group-aware order, so groups stay whole and need no ``g_idx``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from ...errors import LlmpressError
from ...formats.dual_scale import DualScaleWeight
from ...layers import DualScaleLinear, QuantLinear
from ..compressors import dense_proxy, dense_weight
from ..correction import absorb_column_scale
from ..hooks import BlockHooks
from ..stage import UniformQuantStage, register
from .bcq import nearest_codes, pattern_index
from .gptq import GPTQStage, Residual, gptq_quantize, residual_of, solve_columns
from .grid import fake_quantize, fit_grid

MIN_COLUMN_SCALE = 1e-8   # the reference's clamp: a vanishing c would blow up when absorbed


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 values (how scales are stored), keeping them positive."""
    tiny = torch.finfo(torch.float16).tiny
    return x.to(torch.float16).to(x.dtype).clamp_min(tiny)


def gar_permutation(hessian: torch.Tensor, group_size: int) -> torch.Tensor:
    """Group-aware reordering: within each group of ``group_size`` consecutive columns by
    decreasing ``H_jj``, the groups by their largest ``H_jj`` (descending)."""
    diag = torch.diagonal(hessian).to(torch.float64)
    cols = diag.shape[0]
    if group_size <= 0 or group_size >= cols:
        return torch.argsort(diag, descending=True)
    groups = [torch.arange(s, min(s + group_size, cols)) for s in range(0, cols, group_size)]
    inside = [g[torch.argsort(diag[g], descending=True)] for g in groups]
    by_max = torch.argsort(torch.stack([diag[g].max() for g in groups]), descending=True)
    return torch.cat([inside[int(i)] for i in by_max])


def fit_dual_scale(w: torch.Tensor, bits: int, rounds: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r [rows, bits], c [cols])`` for one group ``w [rows, cols]``, fp16-representable.

    Init: ``c_j = mean_i |W_ij|``, then a greedy residual binary coding of ``W/c``; then
    ``rounds`` of (rows, columns, codes) least squares."""
    w = w.to(torch.float64)
    c = w.abs().mean(0).clamp_min(MIN_COLUMN_SCALE)
    residual = w / c
    planes, scales = [], []
    for _ in range(bits):
        b = torch.where(residual >= 0, 1.0, -1.0).to(w.dtype)
        a = residual.abs().mean(-1)
        planes.append(b)
        scales.append(a)
        residual = residual - a.unsqueeze(-1) * b
    r = torch.stack(scales, -1)                                   # [rows, k]
    codes = torch.stack(planes, -1)                               # [rows, cols, k]
    eye = torch.eye(bits, dtype=w.dtype)
    for _ in range(rounds):
        basis = codes * c.unsqueeze(-1)                           # [rows, cols, k]: c_j b_t[i, j]
        gram = basis.transpose(-1, -2) @ basis
        gram = gram + 1e-10 * gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-30)[:, None, None] * eye
        rhs = (basis.transpose(-1, -2) @ w.unsqueeze(-1)).squeeze(-1)
        r = torch.linalg.solve(gram, rhs)
        codes = codes * torch.where(r < 0, -1.0, 1.0).unsqueeze(1)   # a negative scale flips its plane
        r = r.abs()
        s = (codes * r.unsqueeze(1)).sum(-1)                      # [rows, cols]
        c = ((w * s).sum(0).abs() / (s * s).sum(0).clamp_min(1e-30)).clamp_min(MIN_COLUMN_SCALE)
        codes = nearest_codes(w / c, r)
    r = r.sort(-1, descending=True).values
    # c·s with r/s is the same weight: choose s so that c has geometric mean 1, so absorbing it
    # into up_proj's fp16 scales neither underflows nor overflows them.
    s = c.log().mean().exp()
    return _fp16(r * s), _fp16(c / s)


@dataclass
class _DualScaleGrid:
    """DSQ as GPTQ's column quantizer (see ``solve_columns``): a group's ``r`` and ``c`` are fitted
    when the loop reaches its first column; each column is rounded to its nearest level."""

    bits: int
    rounds: int
    order: torch.Tensor             # processed position -> original column
    group_size: int
    r: torch.Tensor                 # [rows, k, n_groups]
    c: torch.Tensor                 # [cols], original order
    _group_of: list[int] = field(init=False)
    _start: list[bool] = field(init=False)
    _length: dict[int, int] = field(init=False)
    current: tuple | None = None

    def __post_init__(self):
        groups = (self.order // self.group_size).tolist()
        self._group_of = groups
        self._start = [p == 0 or groups[p] != groups[p - 1] for p in range(len(groups))]
        self._length = {}
        for g in groups:
            self._length[g] = self._length.get(g, 0) + 1

    def round(self, j: int, w: torch.Tensor, Wt: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
        g = self._group_of[j]
        if self._start[j]:
            # Fit on the group's current values: the block's rows carry every update so far, the
            # rows past it the previous blocks' (the reference, with groups = blocks of 128, sees
            # the same; with smaller groups the outer, stale rows would misfit c by up to a block).
            n = self._length[g]
            i1, W1 = block
            inside = W1[j - i1:j - i1 + n]
            current = torch.cat([inside, Wt[i1 + W1.shape[0]:j + n]]) if inside.shape[0] < n else inside
            r, c = fit_dual_scale(current.T, self.bits, self.rounds)
            self.r[:, :, g] = r.to(self.r.dtype)
            self.c[self.order[j:j + n]] = c.to(self.c.dtype)
            self.current = (r.to(torch.float32), g)
        r = self.current[0]
        cj = float(self.c[self.order[j]])
        planes = nearest_codes((w / cj).unsqueeze(-1), r).squeeze(-2)       # [rows, k]
        return pattern_index(planes).to(w.dtype), cj * (planes * r).sum(-1)

    def bounds(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        top = float(self.c[self.order[j]]) * self.current[0].sum(-1)
        return -top, top


def dsq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, *, bits: int, group_size: int = 128, rounds: int = 15,
    gar: bool = True, damp: float = 0.01, block_size: int = 128, residual: Residual | None = None,
) -> DualScaleWeight:
    """Binary-coded DSQ of ``weight [out, in]`` inside GPTQ's (or, with ``residual``, GPTAQ's)
    column loop; ``gar``: the group-aware column order (else the natural order)."""
    rows, cols = weight.shape
    group_size = group_size if group_size > 0 else cols
    n_groups = -(-cols // group_size)
    order = gar_permutation(hessian, group_size) if gar else torch.arange(cols)
    grid = _DualScaleGrid(bits, rounds, order, group_size, torch.zeros(rows, bits, n_groups), torch.ones(cols))
    solved = solve_columns(weight, hessian, grid, order=order, damp=damp, block_size=block_size, residual=residual)
    index = solved.codes.to(torch.int64)
    signs = torch.stack([(index >> t) & 1 for t in range(bits)]).bool()
    return DualScaleWeight(signs, grid.r.permute(1, 0, 2).contiguous(), grid.c, group_size, solved.metrics)


def fit_column_scale(weight: torch.Tensor, bits: int, group_size: int, sym: bool = False, rounds: int = 15) -> torch.Tensor:
    """The uniform form's ``c [in]``: alternate the group quantizer on ``W·diag(1/c)`` with the
    per-column least-squares ``c_j = ⟨W_:j, Ŵn_:j⟩ / ‖Ŵn_:j‖²`` (``Ŵn`` the quantized normalised
    weight), keeping the best ``c`` by weight error; starts from ``c = 1`` (plain RTN)."""
    w = weight.to(torch.float32)
    cols = w.shape[1]
    group = group_size if group_size > 0 else cols
    c = torch.ones(cols)
    best_c, best_err = c, float("inf")
    for _ in range(rounds + 1):
        normalised = w / c
        q = torch.cat([fake_quantize(normalised[:, s:s + group], fit_grid(normalised[:, s:s + group], bits, sym), bits)
                       for s in range(0, cols, group)], 1)
        err = float((q * c - w).pow(2).sum())
        if err < best_err:
            best_c, best_err = c, err
        c = _fp16((w * q).sum(0) / (q * q).sum(0).clamp_min(1e-30)).clamp_min(MIN_COLUMN_SCALE)
        c = torch.where((q * q).sum(0) > 0, c, torch.ones_like(c))
    return best_c


# -- the method ------------------------------------------------------------------------------

class DSQStage(GPTQStage):
    """D²Quant's dual-scale quantizer (for ``down_proj``) inside the GPTQ/GPTAQ column loop:
    ``binary``: the paper's binary-coded levels ``c_j·Σ±r_t`` (``DualScaleLinear``); ``uniform``: the
    standard grid on ``W·diag(1/c)`` (``QuantLinear``). ``c`` is absorbed into ``up_proj``'s scales
    when the architecture has a gated MLP; ``act_order`` means the reference's group-aware order in
    the binary form (compress/quant/dsq.py)."""

    codes_on_own_grid: ClassVar[bool] = False

    method: Literal["dsq"] = "dsq"
    form: Literal["binary", "uniform"] = "binary"
    group_size: int = 128                # the reference's
    rounds: int = Field(15, ge=0)        # alternating least-squares rounds per group

    @model_validator(mode="after")
    def _binary_bits(self):
        if self.form == "binary" and self.bits > 4:
            raise ValueError("the binary-coded form has 1 to 4 bit-planes")
        return self

    @property
    def label(self) -> str:
        return f"dsq-{self.form} w{self.bits}" + (f" g{self.group_size}" if self.group_size > 0 else "")


def _dsq(stage: DSQStage, weight, stats, bias, dtype):
    """Both forms leave the column scale ``c`` for the block hook to absorb upstream: the binary
    module stores it (``column_scale``), the uniform one returns it as the input scale its
    ``W/c`` grid still needs."""
    hessian = stats["hessian"]
    if stage.form == "binary":
        q = dsq_quantize(weight, hessian, bits=stage.bits, group_size=stage.group_size, rounds=stage.rounds,
                         gar=stage.act_order, damp=stage.damp, block_size=stage.block_size,
                         residual=residual_of(stage, stats))
        return DualScaleLinear.from_dsq(q, bias, dtype), q.metrics
    c = fit_column_scale(weight, stage.bits, stage.group_size, stage.sym, stage.rounds)
    # W x = (W/c)(c ⊙ x): the scaled weight against the Hessian of the scaled inputs
    q = gptq_quantize(
        weight / c, c[:, None] * hessian * c[None, :], bits=stage.bits, group_size=stage.group_size, sym=stage.sym,
        mse=stage.mse, act_order=stage.act_order, static_groups=stage.static_groups, damp=stage.damp,
        block_size=stage.block_size, residual=residual_of(stage, stats, c),
    )
    return QuantLinear.from_quantized(q, bias, dtype), q.metrics, c


def _sink(stage, name: str, arch) -> str | None:
    """The linear that absorbs the column scale ``stage`` gives ``name`` (DSQ on down_proj), if any."""
    sink = arch.column_scale_sink
    return sink[1] if isinstance(stage, DSQStage) and sink is not None and sink[0] == name else None


class ColumnScaleAbsorption(BlockHooks):
    """Moves DSQ's column scale ``c`` of ``down_proj`` into ``up_proj``'s output rows (its scales
    and bias when uniformly quantized, its weight when dense): exact up to fp16 rounding."""

    @classmethod
    def check(cls, stage, plan, arch) -> None:
        """The uniform form stores no column scale: refuse it where nothing can absorb it."""
        for name, assigned in plan.assignment.items():
            if not (isinstance(assigned, DSQStage) and assigned.form == "uniform"):
                continue
            sink = arch.column_scale_sink
            if sink is None or sink[0] != name:
                raise LlmpressError(
                    f"dsq form 'uniform' on {name}: its column scale can only be absorbed into the up projection of a "
                    "gated MLP (down_proj, with no online Hadamard in front); use form 'binary' here")
            sink_stage = plan.assignment.get(sink[1])
            if sink_stage is not None and (not isinstance(sink_stage, UniformQuantStage) or isinstance(sink_stage, DSQStage)):
                raise LlmpressError(f"dsq form 'uniform' on {name}: {sink[1]} must be dense or uniformly quantized "
                                    "(RTN/GPTQ) to absorb the column scale")

    def keeps_output_shortcut(self, ctx, members) -> bool:
        # h + XŴᵀ does not hold once a column scale moves into up_proj: the block's outputs are
        # then recomputed through the absorbed modules, as inference runs them.
        return not any(_sink(ctx.plan.assignment[n], n, ctx.arch) for n in members)

    def after_solve(self, ctx, solved) -> None:
        sink = _sink(solved.stage, solved.name, ctx.arch)
        if sink is None:
            return
        module = solved.module
        stored = getattr(module, "column_scale", None)
        c = stored.to(torch.float32) if stored is not None else solved.input_scale
        if c is None:
            return
        target = ctx.modules.get(sink, ctx.block.get_submodule(sink))
        if not absorb_column_scale(target, c):
            return   # the sink's format cannot take it: the scale stays
        if stored is not None:
            module.take_column_scale()
        solved.input_scale = None
        solved.changed = True
        if sink in ctx.modules:
            ctx.block.set_submodule(sink, dense_proxy(target, dense_weight(target), ctx.device))
        ctx.metrics[solved.name]["bits_per_weight"] = module.stored_bits() / (module.in_features * module.out_features)


register(DSQStage, compress=_dsq, hooks=ColumnScaleAbsorption)
