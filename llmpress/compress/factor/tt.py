"""Tensor-train matrices (TT-matrix / MPO) for linear weights: mode choice, TT-SVD, ranks for a
budget, the activation-aware variant and the edge-core refit (docs/methods/tensor-train.md).

``W [M, N]`` (zero-padded to ``Π m_k × Π n_k`` where a dimension has an awkward prime) is stored as
cores ``G_k [r_{k−1}, m_k, n_k, r_k]`` with row-major multi-indices (``formats.tt``). TT-SVD
(Oseledets 2011) runs in float64 on the interleaved tensor ``[m_1 n_1, …, m_d n_d]``. The aware
variant whitens with a Kronecker approximation of the Gram, ``L = L_1 ⊗ … ⊗ L_d``, one factor per
input mode, which keeps the TT structure and ranks (``TT(W L)·L⁻¹`` with a full ``L`` would not).
"""

from __future__ import annotations

import math
from functools import reduce
from typing import Literal

import torch
from pydantic import Field

from ...errors import LlmpressError
from ...formats.tt import bond_product, tt_full
from ...io.models import STORAGE_DTYPES
from ...layers import TTLinear
from ..stage import Built, FactorValues, StageBase, register
from .whiten import whitening_factor

# -- modes -----------------------------------------------------------------------------------------

def _factorizations(n: int, d: int, smallest: int = 2):
    """Non-decreasing ``d``-tuples of factors ≥ ``smallest`` whose product is ``n``."""
    if d == 1:
        if n >= smallest:
            yield (n,)
        return
    f = smallest
    while f ** d <= n:
        if n % f == 0:
            for rest in _factorizations(n // f, d - 1, f):
                yield (f, *rest)
        f += 1


def balanced_modes(n: int, d: int, max_ratio: float = 2.0, max_pad: float = 0.125) -> tuple[int, ...]:
    """``d`` modes whose product is ``n`` or the smallest ``n' ≥ n`` (at most ``max_pad`` larger)
    that has a balanced factorization (largest / smallest ≤ ``max_ratio``); otherwise the most
    balanced one found. Sorted descending, so the first cores are the larger ones."""
    if d < 1 or n < 1:
        raise ValueError(f"cannot split {n} into {d} modes")
    if d == 1:
        return (n,)
    best = None
    for padded in range(n, n + max(1, int(n * max_pad)) + 1):
        here = min(((m[-1] / m[0], m) for m in _factorizations(padded, d)), default=None)
        if here is None:
            continue
        if here[0] <= max_ratio:
            return tuple(sorted(here[1], reverse=True))
        if best is None or here[0] < best[0] - 1e-12:
            best = here
    if best is None:
        raise ValueError(f"{n} has no split into {d} modes of at least 2")
    return tuple(sorted(best[1], reverse=True))


def bond_caps(out_modes: tuple[int, ...], in_modes: tuple[int, ...]) -> list[int]:
    """The largest useful rank of each of the ``d − 1`` bonds."""
    sizes = [m * n for m, n in zip(out_modes, in_modes)]
    return [min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1:])) for k in range(len(sizes) - 1)]


def tt_ranks(out_modes, in_modes, rank: int) -> list[int]:
    """``[1, r_1, …, r_{d−1}, 1]`` for a uniform rank, capped per bond."""
    return [1, *(min(rank, c) for c in bond_caps(out_modes, in_modes)), 1]


def tt_params(out_modes, in_modes, ranks: list[int]) -> int:
    return sum(ranks[k] * m * n * ranks[k + 1] for k, (m, n) in enumerate(zip(out_modes, in_modes)))


def rank_for_budget(out_modes, in_modes, budget: float) -> int | None:
    """The largest uniform rank whose cores hold at most ``budget`` values (None: not even rank 1)."""
    top = max(bond_caps(out_modes, in_modes), default=1)
    if tt_params(out_modes, in_modes, tt_ranks(out_modes, in_modes, 1)) > budget:
        return None
    lo, hi = 1, top
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tt_params(out_modes, in_modes, tt_ranks(out_modes, in_modes, mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


# -- TT-SVD --------------------------------------------------------------------------------------

def _interleaved(weight: torch.Tensor, out_modes, in_modes) -> torch.Tensor:
    """``W`` zero-padded to ``[M', N']`` as the tensor ``[m_1 n_1, …, m_d n_d]``."""
    d = len(out_modes)
    rows, cols = math.prod(out_modes), math.prod(in_modes)
    padded = weight.new_zeros(rows, cols)
    padded[: weight.shape[0], : weight.shape[1]] = weight
    t = padded.reshape(*out_modes, *in_modes)
    t = t.permute(*[i for k in range(d) for i in (k, d + k)])
    return t.reshape(*(m * n for m, n in zip(out_modes, in_modes)))


def tt_svd(weight: torch.Tensor, out_modes, in_modes, rank: int) -> list[torch.Tensor]:
    """Cores ``[r_{k−1}, m_k, n_k, r_k]`` (float64) of ``W`` truncated to a uniform rank."""
    ranks = tt_ranks(out_modes, in_modes, rank)
    rest = _interleaved(weight.to(torch.float64), out_modes, in_modes)
    cores = []
    for k, (m, n) in enumerate(zip(out_modes[:-1], in_modes[:-1])):
        rest = rest.reshape(ranks[k] * m * n, -1)
        u, s, vt = torch.linalg.svd(rest, full_matrices=False)
        r = ranks[k + 1]
        cores.append(u[:, :r].reshape(ranks[k], m, n, r))
        rest = s[:r, None] * vt[:r]
    cores.append(rest.reshape(ranks[-2], out_modes[-1], in_modes[-1], 1))
    return cores


# -- activation-aware ------------------------------------------------------------------------------

def kronecker_factors(hessian: torch.Tensor, modes: tuple[int, ...]) -> list[torch.Tensor]:
    """``[H_1, …, H_d]`` with ``H ≈ H_1 ⊗ … ⊗ H_d``: the nearest Kronecker product (rank-1 SVD of
    the rearranged matrix), split off one mode at a time; each factor symmetric positive definite
    up to a common sign, which is fixed."""
    factors = []
    h = hessian.to(torch.float64)
    for k, n in enumerate(modes[:-1]):
        rest = h.shape[0] // n
        rearranged = h.reshape(n, rest, n, rest).permute(0, 2, 1, 3).reshape(n * n, rest * rest)
        u, s, vt = torch.linalg.svd(rearranged, full_matrices=False)
        a = (u[:, 0] * s[0].sqrt()).reshape(n, n)
        b = (vt[0] * s[0].sqrt()).reshape(rest, rest)
        if a.trace() < 0:
            a, b = -a, -b
        factors.append((a + a.T) / 2)
        h = (b + b.T) / 2
    factors.append(h)
    return factors


def padded_gram(hessian: torch.Tensor, size: int) -> torch.Tensor:
    """The Gram of inputs zero-padded to ``size``; the padded inputs get the mean diagonal (they are
    always zero, so their weights are free; this keeps the Kronecker factors definite)."""
    n = hessian.shape[0]
    if size == n:
        return hessian.to(torch.float64)
    h = torch.zeros(size, size, dtype=torch.float64)
    h[:n, :n] = hessian.to(torch.float64)
    h[n:, n:] = torch.eye(size - n, dtype=torch.float64) * float(hessian.diagonal().mean())
    return h


def kronecker_whitening(hessian: torch.Tensor, in_modes) -> list[torch.Tensor]:
    """``[L_1, …, L_d]``: the Cholesky factors of the Kronecker factors of the (padded) Gram."""
    gram = padded_gram(hessian, math.prod(in_modes))
    return [whitening_factor(f)[0] for f in kronecker_factors(gram, tuple(in_modes))]


def aware_tt_svd(weight: torch.Tensor, hessian: torch.Tensor, out_modes, in_modes, rank: int,
                 lowers: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """TT-SVD in the Kronecker-factored whitened space, cores mapped back mode by mode (``lowers``:
    :func:`kronecker_whitening` computed once for several ranks of the same layer)."""
    if lowers is None:
        lowers = kronecker_whitening(hessian, in_modes)
    whitening = reduce(torch.kron, lowers)
    padded = weight.new_zeros(weight.shape[0], math.prod(in_modes), dtype=torch.float64)
    padded[:, : weight.shape[1]] = weight.to(torch.float64)
    cores = tt_svd(padded @ whitening, out_modes, in_modes, rank)
    eye = [torch.eye(f.shape[0], dtype=torch.float64) for f in lowers]
    inverses = [torch.linalg.solve_triangular(f, e, upper=False) for f, e in zip(lowers, eye)]
    return [torch.einsum("rmjs,jk->rmks", core, inv) for core, inv in zip(cores, inverses)]


def relative_output_error(delta: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """``‖X ΔWᵀ‖ / ‖X Wᵀ‖`` from ``H ∝ XᵀX`` (not squared, like the factorizations' costs)."""
    h = hessian.to(torch.float64)
    num = ((delta.to(torch.float64) @ h) * delta.to(torch.float64)).sum()
    den = ((weight.to(torch.float64) @ h) * weight.to(torch.float64)).sum()
    return float((num / den).clamp_min(0).sqrt()) if den > 0 else 0.0


def aware_or_plain_tt(weight: torch.Tensor, hessian: torch.Tensor, out_modes, in_modes, rank: int,
                      refit_sweeps: int = 0) -> tuple[list[torch.Tensor], dict[str, float]]:
    """The activation-aware cores, guarded: the Kronecker-whitened TT-SVD where it lowers the exact
    output error ``‖X ΔWᵀ‖ / ‖X Wᵀ‖`` under the full Gram, else the plain TT-SVD. The whitening
    only approximates the Gram (a Kronecker product); where the approximation is poor (SmolLM2's
    MLP inputs) the whitened cores can do worse than none, and the layer's own objective decides.
    ``refit_sweeps`` > 0 then refits the edge cores of the pick exactly (:func:`refit_edge_cores`),
    kept where that lowers the error (it can only rise through the padded inputs' ridge)."""
    shape, exact = tuple(weight.shape), weight.to(torch.float64)
    candidates = {
        "whitened": aware_tt_svd(weight, hessian, out_modes, in_modes, rank),
        "plain": tt_svd(weight, out_modes, in_modes, rank),
    }
    errors = {k: relative_output_error(tt_full(c, shape) - exact, exact, hessian) for k, c in candidates.items()}
    pick = min(errors, key=errors.get)
    cores, error = candidates[pick], errors[pick]
    metrics = {"tt_whitened": float(pick == "whitened"), "rel_output_error_plain": errors["plain"],
               "rel_output_error_whitened": errors["whitened"]}
    if refit_sweeps > 0:
        refit = refit_edge_cores(cores, exact, hessian, refit_sweeps)
        refit_error = relative_output_error(tt_full(refit, shape) - exact, exact, hessian)
        metrics["rel_output_error_svd"] = error
        if refit_error < error:
            cores, error = refit, refit_error
    return cores, {**metrics, "rel_output_error": error}


# -- exact refit of the edge cores -------------------------------------------------------------------

def refit_last_core(cores: list[torch.Tensor], weight: torch.Tensor, gram: torch.Tensor,
                    valid_rows: torch.Tensor) -> torch.Tensor:
    """The last core minimising ``Σ_valid rows (w − ŵ)ᵀ H (w − ŵ)`` with the other cores fixed.

    ``weight`` ``[M', N']`` and ``gram`` ``[N', N']`` are padded (float64), ``valid_rows`` ``[M']``
    marks the real output rows. ``ŵ`` is linear in the core ``G [r, m, n, 1]``: for each output
    mode index ``a`` the unknowns ``G[:, a, :]`` (``r·n`` values) solve one small normal system
    whose matrix ``Σ_i L_iᵀ H L_i`` is shared by every ``a`` with the same real rows."""
    left = bond_product(cores[:-1])                      # [I, J, r]
    r, m, n = cores[-1].shape[:3]
    rows, cols, _ = left.shape
    h4 = gram.reshape(cols, n, cols, n)
    hw = (weight @ gram).reshape(rows, m, cols, n)        # H w of every row (H symmetric)
    valid = valid_rows.reshape(rows, m)
    core = torch.zeros(r, m, n, 1, dtype=torch.float64)
    normals: dict[bytes, torch.Tensor] = {}
    for a in range(m):
        mask = valid[:, a]
        if not bool(mask.any()):
            continue
        key = mask.numpy().tobytes()
        if key not in normals:
            lv = left[mask]
            normal = torch.empty(r, n, r, n, dtype=torch.float64)
            for b in range(n):   # one input mode index at a time: O(I·r·N') memory, not (J·r)²
                t = torch.einsum("ijr,jkc->irkc", lv, h4[:, b])
                normal[:, b] = torch.einsum("irkc,iks->rsc", t, lv)
            normals[key] = normal.reshape(r * n, r * n)
        rhs = torch.einsum("ijr,ijb->rb", left[mask], hw[mask, a]).reshape(r * n, 1)
        core[:, a, :, 0] = torch.linalg.lstsq(normals[key], rhs, driver="gelsd").solution.reshape(r, n)
    return core


def _reversed_modes(cores: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same TT-matrix with the mode order reversed (rows and columns permuted accordingly)."""
    return [c.permute(3, 1, 2, 0) for c in reversed(cores)]


def _mode_reversal(modes) -> torch.Tensor:
    """Indices taking the flat index with the modes reversed to the original flat index."""
    d = len(modes)
    return torch.arange(math.prod(modes)).reshape(*modes).permute(*reversed(range(d))).reshape(-1)


def refit_edge_cores(cores: list[torch.Tensor], weight: torch.Tensor, hessian: torch.Tensor,
                     sweeps: int = 2) -> list[torch.Tensor]:
    """Alternating exact least squares on the last and the first core (the others fixed) against
    the full Gram: each step minimises ``‖X ΔWᵀ‖²`` over one core, so the error never rises (ours).

    The middle cores are left as they are: their normal systems have ``r²·m·n`` unknowns (about
    10⁵ on SmolLM2 at these ranks). Padded inputs carry the mean diagonal in the Gram
    (:func:`padded_gram`): a small ridge on weights the forward never uses."""
    out_modes = tuple(c.shape[1] for c in cores)
    in_modes = tuple(c.shape[2] for c in cores)
    rows, cols = math.prod(out_modes), math.prod(in_modes)
    w = weight.new_zeros(rows, cols, dtype=torch.float64)
    w[: weight.shape[0], : weight.shape[1]] = weight.to(torch.float64)
    gram = padded_gram(hessian, cols)
    valid = torch.arange(rows) < weight.shape[0]
    row_rev, col_rev = _mode_reversal(out_modes), _mode_reversal(in_modes)
    w_rev, gram_rev, valid_rev = w[row_rev][:, col_rev], gram[col_rev][:, col_rev], valid[row_rev]
    cores = [c.to(torch.float64) for c in cores]
    for _ in range(sweeps):
        cores[-1] = refit_last_core(cores, w, gram, valid)
        flipped = _reversed_modes(cores)
        flipped[-1] = refit_last_core(flipped, w_rev, gram_rev, valid_rev)
        cores = _reversed_modes(flipped)
    return cores


def tt_plan(out_features: int, in_features: int, removed: float, order: int):
    """``(out_modes, in_modes, rank)`` of a TT-matrix storing at most ``(1 − removed)`` of the dense
    weight's values, or None when even rank 1 is too big."""
    out_modes, in_modes = balanced_modes(out_features, order), balanced_modes(in_features, order)
    rank = rank_for_budget(out_modes, in_modes, (1.0 - removed) * out_features * in_features)
    return None if rank is None else (out_modes, in_modes, rank)


def tt_factorize(weight: torch.Tensor, removed: float, order: int, hessian: torch.Tensor | None = None,
                 refit_sweeps: int = 0) -> tuple[list[torch.Tensor], dict[str, float]]:
    """The cores of ``W`` for a removed fraction and their metrics: data-free, or activation-aware
    (:func:`aware_or_plain_tt`, with ``refit_sweeps`` of the edge cores) with ``hessian``."""
    plan = tt_plan(weight.shape[0], weight.shape[1], removed, order)
    if plan is None:
        raise ValueError(f"no TT of order {order} removes only {removed:.0%} of a {tuple(weight.shape)} weight")
    out_modes, in_modes, rank = plan
    if hessian is None:
        return tt_svd(weight, out_modes, in_modes, rank), {}
    return aware_or_plain_tt(weight, hessian, out_modes, in_modes, rank, refit_sweeps)


# -- the method ------------------------------------------------------------------------------

class TTStage(StageBase):
    """Tensor-train (TT-matrix) factorization of every selected linear at a uniform removed
    fraction: data-free TT-SVD, or ``aware`` (ours): TT-SVD in a Kronecker-factored whitened space,
    kept for a linear only where it lowers that linear's exact output error (else the plain TT-SVD),
    then ``refit`` sweeps of exact least squares on the edge cores."""

    method: Literal["tt"] = "tt"
    ratio: float = Field(gt=0, lt=1)     # the fraction of each linear's parameters removed
    order: int = Field(3, ge=2, le=4)    # the number of cores d
    aware: bool = False
    # aware only: sweeps of exact least squares on the first and last core against the full Gram
    # after the guarded TT-SVD (ours; 13-27 s per sweep of a 576x1536 linear on one thread here)
    refit: int = Field(1, ge=0)
    values: FactorValues = "float16"

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"hessian"}) if self.aware else frozenset()

    @property
    def label(self) -> str:
        return f"tt{'-aware' if self.aware else ''} d={self.order} -{self.ratio:.0%}"


def tt_module(weight: torch.Tensor, stats: dict, ratio: float, order: int, aware: bool, bias, dtype,
              refit: int = 0, value_dtype: torch.dtype | None = None) -> Built:
    try:
        cores, metrics = tt_factorize(weight, ratio, order, stats["hessian"] if aware else None, refit)
    except ValueError as e:
        raise LlmpressError(str(e)) from None
    return TTLinear.from_cores(cores, tuple(weight.shape), bias, dtype, value_dtype), metrics


def _tt(stage: TTStage, weight, stats, bias, dtype) -> Built:
    return tt_module(weight, stats, stage.ratio, stage.order, stage.aware, bias, dtype, stage.refit,
                     STORAGE_DTYPES[stage.values])


register(TTStage, compress=_tt)
