"""Activation whitening (SVD-LLM's truncation-aware whitening, used by ROCKET too).

With ``H = XᵀX = L Lᵀ`` (Cholesky, L lower triangular) the output error of any approximation of
a linear ``y = x Wᵀ`` is a plain Frobenius norm in the whitened space:

    ‖X Wᵀ − X Ŵᵀ‖²_F = ‖Lᵀ (Wᵀ − Ŵᵀ)‖²_F

so a factorization fitted to ``Lᵀ Wᵀ`` and mapped back with ``L⁻ᵀ`` minimises the layer's output
error on the calibration inputs.
"""

from __future__ import annotations

import torch

# Relative damping tried in turn until the Cholesky succeeds: a Gram of real activations is
# usually positive definite already; a rank-deficient one (dead channels) needs a little.
DAMPING = (0.0, 1e-8, 1e-6, 1e-4, 1e-2)


def whitening_factor(hessian: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(L, damp)``: the float64 lower Cholesky factor of ``H + damp·mean(diag H)·I``."""
    h = hessian.to(torch.float64)
    h = (h + h.T) / 2
    scale = float(h.diagonal().mean()) if h.numel() else 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for damp in DAMPING:
        factor, info = torch.linalg.cholesky_ex(h + damp * max(scale, 1e-30) * eye)
        if int(info) == 0 and torch.isfinite(factor).all():
            return factor, damp
    raise ValueError("the calibration Gram is not positive definite even with 1% damping")


def whiten(weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``Lᵀ Wᵀ`` ``[in, out]`` (float64): the matrix whose Frobenius error is the output error."""
    return factor.T @ weight.to(torch.float64).T


def unwhiten(dictionary: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``L⁻ᵀ D``: a whitened-space dictionary ``[in, k]`` mapped back to the input space."""
    return torch.linalg.solve_triangular(factor.T, dictionary, upper=True)
