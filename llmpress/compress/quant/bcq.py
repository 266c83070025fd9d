"""Binary-coding quantization (BCQ) with power-of-two scales: ShiftAddLLM's quantizer (arXiv
2406.05981; docs/methods/shiftadd.md). The greedy init and alternating refinement are Xu et al.
2018's.

A weight is ``Σ_t α_t · b_t`` (``b_t ∈ {−1, +1}``) with scales rounded to sums of ``terms`` signed
powers of two, shared by ``col_block`` input columns × ``out/row_groups`` rows (the paper's "Lat."
layout). BCQ is a column quantizer in GPTQ's loop: a block's scales are fitted from the current
weights when the loop reaches its first column (weight objective), every column is coded against
them and its error fed forward (output objective): the paper's multi-objective solve.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator

from ...errors import LlmpressError
from ...formats.bcq import BCQWeight, apot_value, bcq_dense
from ...layers import BCQLinear
from ..factor.knapsack import Option
from ..stage import Built, StageBase, register
from .gptq import solve_columns
from .hessian import damped_inverse_cholesky


def apot_round(alpha: torch.Tensor, terms: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, exponents int8, signs int8)``: ``alpha ≈ Σ_p sign_p·2^exp_p`` chosen greedily
    (``e = round(log2 |residual|)`` term by term); a zero term has sign 0."""
    residual = alpha.to(torch.float64).clone()
    exps = torch.zeros(*alpha.shape, terms, dtype=torch.int8)
    signs = torch.zeros(*alpha.shape, terms, dtype=torch.int8)
    for p in range(terms):
        mag = residual.abs()
        live = mag > 0
        e = torch.round(torch.log2(torch.where(live, mag, torch.ones_like(mag)))).clamp(-126, 127)
        s = torch.sign(residual) * live
        exps[..., p] = e.to(torch.int8)
        signs[..., p] = s.to(torch.int8)
        residual = residual - s * torch.exp2(e)
    return apot_value(exps, signs).to(alpha.dtype), exps, signs


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


@functools.lru_cache(maxsize=16)
def _patterns(q: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([[1.0 if (p >> t) & 1 else -1.0 for t in range(q)] for p in range(2 ** q)], dtype=dtype)


def level_table(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For scales ``alpha [..., q]``: the ``2^q`` levels ``[..., 2^q]`` and their sign patterns
    ``[2^q, q]`` (±1)."""
    patterns = _patterns(alpha.shape[-1], alpha.dtype)
    return alpha @ patterns.T, patterns


def nearest_codes(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Sign planes ``[..., n, q]`` (±1) of the level nearest each entry of ``w [..., n]`` under
    scales ``alpha [..., q]`` (broadcast over the last axis of ``w``)."""
    levels, patterns = level_table(alpha)                        # [..., 2^q]
    # the nearest of the sorted levels: count the midpoints below each entry
    levels, order = levels.sort(-1)
    mids = (levels[..., 1:] + levels[..., :-1]) / 2
    best = (w.unsqueeze(-1) > mids.unsqueeze(-2)).sum(-1)          # [..., n]
    return patterns[order.gather(-1, best)]


def fit_bcq(w: torch.Tensor, bits: int, rounds: int = 15, terms: int = 3) -> torch.Tensor:
    """Scales ``[..., q]`` (descending, rounded to APoT) for the entries of ``w [..., n]``: greedy
    residual init, then alternating least squares (scales given codes, codes given scales)."""
    w = w.to(torch.float64)
    residual = w.clone()
    planes = []
    alphas = []
    for _ in range(bits):
        b = _sign(residual)
        a = residual.abs().mean(-1)
        planes.append(b)
        alphas.append(a)
        residual = residual - a.unsqueeze(-1) * b
    alpha = torch.stack(alphas, -1)
    codes = torch.stack(planes, -1)                               # [..., n, q]
    eye = torch.eye(bits, dtype=torch.float64)
    for _ in range(rounds):
        gram = codes.transpose(-1, -2) @ codes + 1e-9 * eye      # [..., q, q]
        rhs = (codes.transpose(-1, -2) @ w.unsqueeze(-1)).squeeze(-1)
        alpha = torch.linalg.solve(gram, rhs.unsqueeze(-1)).squeeze(-1)
        alpha = alpha.abs().sort(-1, descending=True).values       # signs fold into the codes
        codes = nearest_codes(w, alpha)
    alpha = alpha.abs().sort(-1, descending=True).values
    return apot_round(alpha, terms)[0]


def pattern_index(planes: torch.Tensor) -> torch.Tensor:
    """The level's index ``Σ_t [b_t = +1]·2^t`` of sign planes ``[..., k]``."""
    weights = 2 ** torch.arange(planes.shape[-1])
    return ((planes > 0).to(torch.int64) * weights).sum(-1)


@dataclass
class _BCQGrid:
    """BCQ as GPTQ's column quantizer (see ``solve_columns``): a block's scales are fitted from its
    current values when the loop reaches its first column; each column is coded against them."""

    bits: int
    col_block: int
    row_groups: int
    rounds: int
    terms: int
    exps: torch.Tensor      # [q, row_groups, col_blocks, terms] int8
    signs: torch.Tensor     # same shape
    alpha: torch.Tensor | None = None   # [out, q]: the scales in force

    def round(self, j: int, w: torch.Tensor, Wt: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
        if j % self.col_block == 0:   # block sizes are multiples of col_block: the slab is in the block
            i1, W1 = block
            slab = W1[j - i1:j - i1 + self.col_block].T.reshape(self.row_groups, -1)
            _, e, s = apot_round(fit_bcq(slab, self.bits, self.rounds, self.terms), self.terms)
            c = j // self.col_block
            self.exps[:, :, c], self.signs[:, :, c] = e.permute(1, 0, 2), s.permute(1, 0, 2)
            self.alpha = apot_value(e, s).to(w.dtype).repeat_interleave(w.shape[0] // self.row_groups, 0)
        planes = nearest_codes(w.unsqueeze(-1), self.alpha).squeeze(-2)    # [out, q]
        return pattern_index(planes).to(w.dtype), (planes * self.alpha).sum(-1)

    def bounds(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        return -self.alpha.sum(-1), self.alpha.sum(-1)


def bcq_quantize(weight: torch.Tensor, hessian: torch.Tensor | None, *, bits: int, col_block: int = 8,
                 row_groups: int = 8, rounds: int = 15, terms: int = 3, damp: float = 0.01,
                 block_size: int = 128) -> BCQWeight:
    """BCQ of ``W [out, in]``: with ``hessian``, inside GPTQ's column loop (error feedback through
    the inverse Hessian's Cholesky factor, lazy blocks); without, data-free (weight objective)."""
    out, inp = weight.shape
    if out % row_groups:
        raise ValueError(f"{out} output rows do not split into {row_groups} row groups")
    exps = torch.zeros(bits, row_groups, -(-inp // col_block), terms, dtype=torch.int8)
    grid = _BCQGrid(bits, col_block, row_groups, rounds, terms, exps, torch.zeros_like(exps))
    if hessian is None:   # no error feedback: every column coded as it is
        Wt = weight.detach().to(torch.float32).T.contiguous()
        codes = torch.stack([grid.round(j, Wt[j], Wt, (0, Wt))[0] for j in range(inp)], 1)
        metrics = {}
    else:
        block_size = col_block * max(1, block_size // col_block)
        solved = solve_columns(weight, hessian, grid, damp=damp, block_size=block_size)
        codes, metrics = solved.codes, solved.metrics
    index = codes.to(torch.int64)
    signs = torch.stack([(index >> t) & 1 for t in range(bits)]).bool()
    return BCQWeight(signs, grid.exps, grid.signs, col_block, metrics)


# -- the method ------------------------------------------------------------------------------

class ShiftAddStage(StageBase):
    """ShiftAddLLM: binary-coded weights with power-of-two scales, solved inside GPTQ's column loop
    (``gptq: false``: the weight objective only, the BCQ baseline); compress/quant/bcq.py."""

    method: Literal["shiftadd"] = "shiftadd"
    bits: int = Field(ge=1, le=4)
    col_block: int = Field(8, ge=1)      # columns sharing a scale (the paper's Lat. layout: 8)
    row_groups: int = Field(8, ge=1)     # row groups sharing a scale (out/8 rows each)
    terms: int = Field(3, ge=1, le=4)    # powers of two per scale (the code's apot_nums)
    rounds: int = Field(15, ge=0)        # alternating least-squares rounds per scale fit
    gptq: bool = True
    damp: float = Field(0.01, gt=0, le=1)
    block_size: int = Field(128, ge=1)
    true_sequential: bool = True

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"hessian"}) if self.gptq else frozenset()

    @property
    def label(self) -> str:
        return f"shiftadd w{self.bits}" + ("" if self.gptq else " (bcq only)")


class ShiftAddMixStage(ShiftAddStage):
    """ShiftAdd with its bit width chosen per linear under an average-bits budget: every linear's
    GPTQ-BCQ solution is measured at each of ``bit_choices`` (its output error on the calibration
    inputs) and the shared knapsack picks one per linear so that the code bits average at most
    ``average_bits`` (the paper: 2.2)."""

    kind: ClassVar[str] = "allocator"
    method: Literal["shiftadd-mix"] = "shiftadd-mix"
    bits: int = Field(2, ge=1, le=4)     # set per module by the allocation
    average_bits: float = Field(2.2, gt=0)
    bit_choices: list[int] = Field(default_factory=lambda: [2, 3], min_length=1)
    buckets: int = Field(50_000, ge=100)
    safety_cap: bool = False

    @field_validator("bit_choices")
    @classmethod
    def _choices(cls, v: list[int]) -> list[int]:
        if any(not 1 <= b <= 4 for b in v):
            raise ValueError("bit_choices are widths from 1 to 4")
        return sorted(set(v))

    @model_validator(mode="after")
    def _reachable(self):
        if self.average_bits < min(self.bit_choices):
            raise ValueError(f"average_bits {self.average_bits} is below the smallest choice {min(self.bit_choices)}")
        return self

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"hessian"})

    keep_dense: ClassVar[bool] = False   # every selected linear takes one of the bit widths

    def removed_target(self, value_bits: int) -> float:
        return 1.0 - self.average_bits / value_bits


def _shiftadd(stage: ShiftAddStage, weight, stats, bias, dtype) -> Built:
    try:
        q = bcq_quantize(weight, stats.get("hessian") if stage.gptq else None, bits=stage.bits,
                         col_block=stage.col_block, row_groups=stage.row_groups, rounds=stage.rounds,
                         terms=stage.terms, damp=stage.damp, block_size=stage.block_size)
    except ValueError as e:
        raise LlmpressError(str(e)) from None
    return BCQLinear.from_bcq(q, bias, dtype), q.metrics


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


register(ShiftAddStage, compress=_shiftadd)
register(ShiftAddMixStage, compress=_shiftadd, profile=_shiftadd_options)
