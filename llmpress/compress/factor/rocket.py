"""ROCKET (arXiv 2602.11008): single-step sparse-dictionary factorization in the whitened space,
with per-layer candidates for a global knapsack allocation (docs/methods/rocket.md, also for
where we depart from the reference code: sizes that count indices, per-column recovery, errors in
the whitened space, "keep" meaning dense).

For one linear, in the whitened space ``Xw = Lᵀ Wᵀ`` (whiten.py), with budget ``(k, s)``: the top-k
left singular vectors ``U_k`` and ``C₀ = U_kᵀ Xw``; atom sensitivities ``a_i = ‖L⁻ᵀ U_k[:, i]‖``
and scores ``|C₀ij| · a_i^λ``, of which every output keeps its top ``s' = ⌊s − 0.005·k⌋``; the
remaining slots recovered per column by ``|C₀ij| · a_i``; the dictionary in closed form,
``D = Xw Cᵀ (C Cᵀ + εI)⁻¹``, kept if it beats ``U_k``; ``A = L⁻ᵀ D``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator

from ...errors import LlmpressError
from ...formats.factor import Factors, factor_bits, index_bits
from ...io.models import STORAGE_DTYPES
from ...layers import FactorLinear
from ..stage import AllocatorStage, Built, FactorValues, register
from .knapsack import Option
from .whiten import unwhiten, whiten, whitening_factor

# The paper's grids: removed fraction 0.05..0.70; the κ = k/s grid is coarser than the code's
# 1.0..3.0 in steps of 0.1 (294 fits per layer), and stops where indices make κ useless (below).
REMOVED_GRID = tuple(round(0.05 * i, 2) for i in range(1, 15))
KAPPA_GRID = (1.0, 2.0, 3.0)
LAMBDA = 0.5            # score = |C0| · a^λ: a geometric blend of magnitude and input-space norm
EXTRA_SPARSITY = 0.005  # slots per column held back for the recovery step, as a fraction of k


@dataclass
class LayerProfile:
    """The whitened SVD of one linear, shared by all its candidates."""

    factor: torch.Tensor      # L [in, in]
    damp: float
    xw: torch.Tensor          # Lᵀ Wᵀ [in, out]
    u: torch.Tensor
    s: torch.Tensor
    vt: torch.Tensor
    atom_norm: torch.Tensor   # ‖L⁻ᵀ u_i‖ per singular vector

    @property
    def shape(self) -> tuple[int, int]:
        return self.xw.shape[0], self.xw.shape[1]

    def to(self, dtype: torch.dtype) -> LayerProfile:
        return LayerProfile(self.factor, self.damp, *(t.to(dtype) for t in (self.xw, self.u, self.s, self.vt, self.atom_norm)))


def profile_layer(weight: torch.Tensor, hessian: torch.Tensor) -> LayerProfile:
    factor, damp = whitening_factor(hessian)
    xw = whiten(weight, factor)
    u, s, vt = torch.linalg.svd(xw, full_matrices=False)
    return LayerProfile(factor, damp, xw, u, s, vt, unwhiten(u, factor).norm(dim=0))


def budget_shape(in_features: int, out_features: int, removed: float, kappa: float,
                 value_bits: int) -> tuple[int, int | None]:
    """``(k, s)`` whose stored size is at most ``(1 − removed)`` of the dense layer's."""
    budget = (1.0 - removed) * in_features * out_features * value_bits
    if kappa == 1.0:
        return int(budget // ((in_features + out_features) * value_bits)), None
    rank = int(budget // (in_features * value_bits + out_features * (value_bits + 16) / kappa))
    if index_bits(rank) != 16:
        rank = int(budget // (in_features * value_bits + out_features * (value_bits + 32) / kappa))
    return rank, max(1, int(rank / kappa))


def sparse_mask(profile: LayerProfile, rank: int, nnz: int, lam: float = LAMBDA,
                extra_sparsity: float = EXTRA_SPARSITY) -> torch.Tensor:
    """``[k, out]``: exactly ``nnz`` atoms per output column, by sensitivity score then recovery."""
    c0 = profile.s[:rank, None] * profile.vt[:rank]
    a = profile.atom_norm[:rank, None]
    main = max(1, int(nnz - extra_sparsity * rank))
    main = min(main, nnz)
    mask = torch.zeros_like(c0, dtype=torch.bool)
    mask.scatter_(0, (c0.abs() * a.pow(lam)).topk(main, dim=0).indices, True)
    if nnz > main:
        recovery = (c0.abs() * a).masked_fill(mask, -1.0)
        mask.scatter_(0, recovery.topk(nnz - main, dim=0).indices, True)
    return mask


def fit(profile: LayerProfile, rank: int, nnz: int | None, lam: float = LAMBDA) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """``(D, C, mask, relative error)`` in the whitened space for budget ``(k, s)``."""
    total = float(profile.s.pow(2).sum())
    uk = profile.u[:, :rank]
    c0 = profile.s[:rank, None] * profile.vt[:rank]
    if nnz is None or nnz >= rank:   # dense C: the truncated SVD is optimal
        err = float(profile.s[rank:].pow(2).sum()) / total if total > 0 else 0.0
        return uk, c0, None, err ** 0.5
    mask = sparse_mask(profile, rank, nnz, lam)
    c = c0 * mask
    p = profile.xw @ c.T                    # [in, k]
    gram = c @ c.T                          # [k, k]
    eps = max(1e-6, 1e-3 * float(gram.trace()) / rank)
    d_ls = torch.cholesky_solve(p.T, torch.linalg.cholesky(gram + eps * torch.eye(rank, dtype=gram.dtype))).T

    def sq_error(d: torch.Tensor, dtd_trace_with_gram: float) -> float:
        return total - 2 * float((d * p).sum()) + dtd_trace_with_gram

    err_ls = sq_error(d_ls, float(((d_ls.T @ d_ls) * gram).sum()))
    err_eig = sq_error(uk, float(gram.trace()))   # U_kᵀ U_k = I
    d, err = (d_ls, err_ls) if err_ls <= err_eig else (uk, err_eig)
    return d, c, mask, (max(err, 0.0) / total) ** 0.5 if total > 0 else 0.0


def candidates(profile: LayerProfile, value_bits: int, removed_grid=REMOVED_GRID, kappas=KAPPA_GRID,
               lam: float = LAMBDA) -> list[Option]:
    """For every removed fraction, the best κ's ``(k, s)`` with its real error (``‖Xw − D C‖ /
    ‖Xw‖``) and stored bits; settings ``{"rank": k, "nnz": s or None}``. Scored in float32 (twice
    as fast; the errors compared are ~1e-2 apart, float32 resolves ~1e-6)."""
    profile = profile.to(torch.float32)
    d_in, d_out = profile.shape
    dense_rank = None
    out = []
    for removed in removed_grid:
        best = None
        for kappa in kappas:
            rank, nnz = budget_shape(d_in, d_out, removed, kappa, value_bits)
            if rank < 1 or rank > min(d_in, d_out):
                continue
            if kappa == 1.0:
                dense_rank = rank
            elif dense_rank is not None and rank <= dense_rank:
                continue   # the indices cost more than the extra atoms give: never better than κ = 1
            *_, err = fit(profile, rank, nnz, lam)
            if best is None or err < best.error:
                best = Option(removed, err, factor_bits(d_in, d_out, rank, nnz, value_bits), {"rank": rank, "nnz": nnz})
        if best is not None:
            out.append(best)
    return out


def rocket_factors(weight: torch.Tensor, hessian: torch.Tensor, rank: int, nnz: int | None,
                   lam: float = LAMBDA) -> Factors:
    """The factors of one linear at its allocated ``(k, s)``."""
    profile = profile_layer(weight, hessian)
    d, c, mask, err = fit(profile, rank, nnz, lam)
    return Factors(unwhiten(d, profile.factor), c, mask, metrics={"whitened_error": err, "damp": profile.damp})


# -- the method ------------------------------------------------------------------------------

class RocketStage(AllocatorStage):
    """ROCKET: whitened sparse-dictionary factorization, with the removed fraction of each linear
    chosen by the knapsack over the candidates' measured errors (compress/factor/rocket.py)."""

    method: Literal["rocket"] = "rocket"
    kappas: list[float] = Field(default_factory=lambda: [1.0, 2.0, 3.0])   # k/s; 1: dense coefficients
    lam: float = Field(0.5, ge=0)        # score = |C0| · a^lam
    safety_cap: bool = True              # the paper's
    rank: int | None = Field(None, ge=1)   # set per module by the allocation
    nnz: int | None = Field(None, ge=1)
    values: FactorValues = "float16"     # the allocator counts bits at this width, indices included

    @field_validator("kappas")
    @classmethod
    def _kappas(cls, v: list[float]) -> list[float]:
        if not v or any(k < 1 for k in v):
            raise ValueError("kappas are ratios k/s of at least 1")
        return sorted(set(v))

    @property
    def label(self) -> str:
        if self.rank is None:
            return "rocket"
        return f"rocket k={self.rank}" + (f" s={self.nnz}" if self.nnz else "")


def _rocket(stage: RocketStage, weight, stats, bias, dtype) -> Built:
    if stage.rank is None:
        raise LlmpressError("no rank was allocated to this module (the ROCKET plan is missing)")
    factors = rocket_factors(weight, stats["hessian"], stage.rank, stage.nnz, stage.lam)
    return FactorLinear.from_factors(factors, bias, dtype, STORAGE_DTYPES[stage.values]), factors.metrics


def _rocket_options(stage: RocketStage, weight, hessian, value_bits: int) -> list[Option]:
    return candidates(profile_layer(weight, hessian), value_bits, stage.removed_grid, stage.kappas, stage.lam)


register(RocketStage, compress=_rocket, profile=_rocket_options)
