"""Low-rank factors ``Wᵀ ≈ A C`` and the storage they cost; truncated SVD and SVD-LLM.

Orientation follows ROCKET: for ``W [out, in]``, the dictionary ``A`` is ``[in, k]`` and the
coefficients ``C`` are ``[k, out]``; the layer computes ``y = (x A) C``. ``C`` is dense, or
column-sparse with the same number ``nnz`` of atoms per output (stored as values + indices).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ...formats.factor import Factors
from ...io.models import STORAGE_DTYPES
from ...layers import FactorLinear
from ..stage import Built, FactorValues, StageBase, register
from .whiten import unwhiten, whiten, whitening_factor


def rank_for_ratio(in_features: int, out_features: int, removed: float) -> int:
    """SVD-LLM's rank for a removed parameter fraction: ``k(m + n) ≤ (1 − ρ) m n``."""
    return max(1, int((1.0 - removed) * in_features * out_features // (in_features + out_features)))


def _balanced(target: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_k √Σ_k, √Σ_k V_kᵀ, Σ)`` of ``target``: the best rank-k pair, magnitudes balanced so fp16
    storage loses neither factor."""
    u, s, vt = torch.linalg.svd(target, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vt[:rank], s


def svd_factors(weight: torch.Tensor, rank: int) -> Factors:
    """Plain truncated SVD of ``Wᵀ`` (the data-free baseline)."""
    a, c, s = _balanced(weight.to(torch.float64).T, rank)
    kept = float((s[:rank] ** 2).sum() / (s ** 2).sum()) if s.numel() else 1.0
    return Factors(a, c, metrics={"energy_kept": kept})


def whitened_svd_factors(weight: torch.Tensor, hessian: torch.Tensor, rank: int) -> Factors:
    """SVD-LLM: the truncated SVD of ``Lᵀ Wᵀ``, the dictionary mapped back with ``L⁻ᵀ``; optimal for
    the layer's output error on the calibration inputs among rank-k matrices."""
    factor, damp = whitening_factor(hessian)
    d, c, s = _balanced(whiten(weight, factor), rank)
    err = float((s[rank:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt()) if s.numel() else 0.0
    return Factors(unwhiten(d, factor), c, metrics={"whitened_error": err, "damp": damp})


# -- the method ------------------------------------------------------------------------------

class LowRankStage(StageBase):
    """A uniform low-rank factorization of every selected linear: ``svd`` truncates the weight's
    SVD (data-free), ``svdllm`` the SVD of the activation-whitened weight (SVD-LLM)."""

    method: Literal["svd", "svdllm"]
    ratio: float = Field(gt=0, lt=1)     # the fraction of each linear's parameters removed
    values: FactorValues = "float16"

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"hessian"}) if self.method == "svdllm" else frozenset()

    @property
    def label(self) -> str:
        return f"{self.method} -{self.ratio:.0%}"


def lowrank_module(weight: torch.Tensor, stats: dict, ratio: float, whitened: bool, bias, dtype,
                   value_dtype: torch.dtype | None = None) -> Built:
    rank = rank_for_ratio(weight.shape[1], weight.shape[0], ratio)
    factors = whitened_svd_factors(weight, stats["hessian"], rank) if whitened else svd_factors(weight, rank)
    return FactorLinear.from_factors(factors, bias, dtype, value_dtype), factors.metrics


def _lowrank(stage: LowRankStage, weight, stats, bias, dtype) -> Built:
    return lowrank_module(weight, stats, stage.ratio, stage.method == "svdllm", bias, dtype,
                          STORAGE_DTYPES[stage.values])


register(LowRankStage, compress=_lowrank)
