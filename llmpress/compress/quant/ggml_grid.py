"""Fitting GGML's grids: llama.cpp's own reference quantizers, restated from its published format
(``ggml-quants.c``, MIT), vectorized over every block of a weight.

``reference_quantize(w, type)`` is what ``llama-quantize`` writes without an importance matrix:
the legacy types through the ``gguf`` package's bit-exact port; the K-quants through the same
searches, in the same fp32 order of operations (sums accumulated element by element):

- ``Q2_K``: ``make_qkx2_quants(16, 3, weights |x|, rmin −0.5, step 0.1, 15 steps, absolute error)``
  per sub-block of 16, then the 16 scales and 16 minima quantized to 4 bits against the largest;
- ``Q3_K``: ``make_q3_quants(16, 4, rmse)`` (a coordinate descent on the codes, 5 passes), scales
  to signed 6 bits against the largest magnitude;
- ``Q4_K``/``Q5_K``: ``make_qkx2_quants(32, 15|31, weights √mean(x²) + |x|, rmin −1|−0.5, 0.1,
  20|15 steps, squared error)``, scales and minima to 6 bits;
- ``Q6_K``: ``make_qx_quants(16, 32, rmse_type 1)`` (19 trial scales), scales to signed 8 bits.

Every type then rounds each weight to the grid it stored (the quantized sub-block scales), which
is why GPTQ can take the grid and replace only that last rounding (``FixedGGMLGrid``).

``importance_quantize(w, type, importance)`` is what ``llama-quantize --imatrix`` writes: the same
searches weighted by each input's mean square (``quantize_row_*_impl``), and the K-quants' sub-block
scales fitted by ``make_qp_quants`` (their ``make_qkx3_quants`` is ``make_qkx2_quants`` below with
the weights given).

Bit-exactness rests on plain IEEE fp32 arithmetic on both sides (llama.cpp's reference quantizers
live in ``ggml-base``, built without FMA or fast-math) and on correctly rounded square roots
(torch's fp32 ``sqrt`` can be one ulp off: it is taken in fp64). docs/methods/gguf.md gives the
measured agreement with llama.cpp's own bytes.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from ...formats.ggml import QK_K, GGMLType, GGMLWeight, grid_step_offset

_F = torch.float32
GROUP_MAX_EPS = 1e-15


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(np.float32(v), dtype=_F)


def _sequential_sum(v: torch.Tensor) -> torch.Tensor:
    """``Σ v`` along the last axis, accumulated element by element as the reference does (fp32
    addition is not associative: torch's own sum would change bytes)."""
    total = torch.zeros(v.shape[:-1], dtype=_F)
    for i in range(v.shape[-1]):
        total = total + v[..., i]
    return total


def _first_max_abs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The signed value of largest magnitude along the last axis (the first one on ties) and that magnitude."""
    idx = x.abs().argmax(dim=-1, keepdim=True)
    value = torch.gather(x, -1, idx).squeeze(-1)
    return value, value.abs()


def _clamp_round(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return torch.clamp(torch.round(v), lo, hi)


def make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale, minimum (positive: subtracted) and codes of each row of ``x`` ``[N, n]`` on an
    asymmetric ``nmax + 1``-level grid: the min/max grid, then ``nstep + 1`` trial scales each
    refined by weighted least squares, the one of least weighted error kept."""
    n = x.shape[1]
    xmin = x.min(dim=1).values.clamp(max=0)
    xmax = x.max(dim=1).values
    sum_w = _sequential_sum(weights)
    sum_x = _sequential_sum(weights * x)
    flat = xmax == xmin
    span = torch.where(flat, torch.ones_like(xmax), xmax - xmin)

    def codes_at(iscale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
        return _clamp_round(iscale[:, None] * (x - minimum[:, None]), 0, nmax)

    def error(scale: torch.Tensor, minimum: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(scale)
        for i in range(n):
            diff = scale * codes[:, i] + minimum - x[:, i]
            diff = diff.abs() if use_mad else diff * diff
            total = total + weights[:, i] * diff
        return total

    iscale = _f32(nmax) / span
    scale = 1 / iscale
    minimum = xmin.clone()
    codes = codes_at(iscale, minimum)
    best = error(scale, minimum, codes)
    for step in range(nstep + 1):
        trial = (_f32(rmin) + _f32(rdelta) * _f32(step)) + _f32(nmax)
        # the reference updates `min` as it goes: later trials start from the best fit so far
        span = torch.where(flat, torch.ones_like(xmax), xmax - minimum)
        cand = codes_at(trial / span, minimum)
        sum_l = torch.zeros_like(xmax)
        sum_l2 = torch.zeros_like(xmax)
        sum_xl = torch.zeros_like(xmax)
        for i in range(n):
            wl = weights[:, i] * cand[:, i]
            sum_l = sum_l + wl
            sum_l2 = sum_l2 + wl * cand[:, i]
            sum_xl = sum_xl + wl * x[:, i]
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = torch.where(ok, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)), this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        cur = error(this_scale, this_min, cand)
        better = ok & (cur < best)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        minimum = torch.where(better, this_min, minimum)
        codes = torch.where(better[:, None], cand, codes)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    codes = torch.where(flat[:, None], torch.zeros_like(codes), codes)
    return scale, -minimum, codes


def _refine_codes(x: torch.Tensor, w: torch.Tensor, L: torch.Tensor, lo: int | None, hi: int,
                  rest_positive: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's per-code refinement of a fixed-scale fit: up to five passes over the codes, each
    moved to ``round(x·Σ'w·l²/Σ'w·x·l)`` (sums over the others, clamped to ``[lo, hi]``) where that
    raises ``(Σw·x·l)²/Σw·l²``; a code is tried only where the others' ``Σw·x·l`` is positive
    (``make_q3_quants``), and their ``Σw·l²`` too with ``rest_positive`` (``make_qp_quants``).
    Returns the codes and their two sums."""
    sumlx = torch.zeros(x.shape[0], dtype=_F)
    suml2 = torch.zeros(x.shape[0], dtype=_F)
    for i in range(x.shape[1]):
        sumlx = sumlx + w[:, i] * x[:, i] * L[:, i]
        suml2 = suml2 + w[:, i] * L[:, i] * L[:, i]
    for _ in range(5):   # a pass without a change leaves the state as it was: extra passes are no-ops
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i], x[:, i], L[:, i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            live = (slx > 0) & (sl2 > 0) if rest_positive else slx > 0
            new_l = torch.round(xi * sl2 / torch.where(live, slx, torch.ones_like(slx))).clamp(lo, hi)
            slx2 = slx + wi * xi * new_l
            sl2b = sl2 + wi * new_l * new_l
            take = live & (new_l != li) & (sl2b > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl2b)
            L[:, i] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl2b, suml2)
    return L, sumlx, suml2


def make_q3_quants(x: torch.Tensor, nmax: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed scale and codes ``[0, 2·nmax)`` of each row of ``x`` ``[N, n]``: codes from the
    largest magnitude, then up to five passes of per-code changes that raise ``(Σw·x·l)²/Σw·l²``
    (``w = x²``), the scale their weighted least-squares fit."""
    top, amax = _first_max_abs(x)
    zero = amax < GROUP_MAX_EPS
    iscale = -_f32(nmax) / torch.where(zero, torch.ones_like(top), top)
    L = _clamp_round(iscale[:, None] * x, -nmax, nmax - 1)
    L, sumlx, suml2 = _refine_codes(x, x * x, L, -nmax, nmax - 1, rest_positive=False)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)), torch.zeros_like(suml2))
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero[:, None], torch.full_like(L, -nmax), L)
    return scale, L + nmax


def make_qx_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed scale and codes ``[0, 2·nmax)`` of each row of ``x`` (``rmse_type`` 1: weights
    ``x²`` unless given): 19 trial scales around ``−nmax / max``, each refit by weighted least squares."""
    n = x.shape[1]
    top, amax = _first_max_abs(x)
    zero = amax < GROUP_MAX_EPS
    top_safe = torch.where(zero, torch.ones_like(top), top)
    w = x * x if weights is None else weights

    def trial(iscale: torch.Tensor):
        L = _clamp_round(iscale[:, None] * x, -nmax, nmax - 1)
        sumlx = torch.zeros_like(top)
        suml2 = torch.zeros_like(top)
        for i in range(n):
            sumlx = sumlx + w[:, i] * x[:, i] * L[:, i]
            suml2 = suml2 + w[:, i] * L[:, i] * L[:, i]
        return L, sumlx, suml2

    L, sumlx, suml2 = trial(-_f32(nmax) / top_safe)
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, torch.ones_like(suml2)), torch.zeros_like(suml2))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        cand, slx, sl2 = trial(-(_f32(nmax) + _f32(0.1) * _f32(step)) / top_safe)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        L = torch.where(better[:, None], cand, L)
        scale = torch.where(better, slx / torch.where(sl2 > 0, sl2, torch.ones_like(sl2)), scale)
        best = torch.where(better, scale * slx, best)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero[:, None], torch.full_like(L, -nmax), L)
    return scale, L + nmax


def make_qp_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and codes ``[0, nmax]`` of each row of non-negative ``x`` ``[N, n]`` (the sub-block
    scales or minima of a super-block): the best of nine trial scales around ``max / nmax`` by
    weighted squared error, then up to five passes of per-code changes that raise
    ``(Σw·x·l)²/Σw·l²``, the scale their weighted least-squares fit."""
    n = x.shape[1]
    top = x.max(dim=1).values.clamp(min=0)
    zero = top < GROUP_MAX_EPS
    top_safe = torch.where(zero, torch.ones_like(top), top)

    def mse(scale: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(top)
        for i in range(n):
            diff = x[:, i] - scale * L[:, i]
            total = total + weights[:, i] * diff * diff
        return total

    iscale = _f32(nmax) / top_safe
    best = mse(1 / iscale, torch.round(iscale[:, None] * x))
    for step in range(-4, 5):
        if step == 0:
            continue
        trial = (_f32(0.1) * _f32(step) + _f32(nmax)) / top_safe
        cur = mse(1 / trial, torch.round(trial[:, None] * x).clamp(max=nmax))
        better = cur < best
        best = torch.where(better, cur, best)
        iscale = torch.where(better, trial, iscale)
    L = torch.round(iscale[:, None] * x).clamp(max=nmax)
    L, sumlx, suml2 = _refine_codes(x, weights, L, None, nmax, rest_positive=True)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)), torch.zeros_like(suml2))
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero[:, None], torch.zeros_like(L), L)
    return scale, L


def _round_to_grid(t: GGMLType, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None,
                   fallback: torch.Tensor) -> torch.Tensor:
    """The reference's last step: every weight rounded on the stored grid (``x`` ``[N, sub]``, ``a``
    ``[N]``); sub-blocks whose step is zero keep the search's codes ``fallback``."""
    safe = torch.where(a == 0, torch.ones_like(a), a)[:, None]
    if t.zero is None:
        codes = _clamp_round((x + b[:, None]) / safe, 0, t.max_code)
    else:
        codes = _clamp_round(x / safe, -t.zero, t.max_code - t.zero) + t.zero
    return torch.where((a == 0)[:, None], fallback, codes)


def _q6_k_fit(x: torch.Tensor, weights: torch.Tensor | None, per: int):
    """Q6_K's sub-block search (``make_qx_quants``, 32 levels a side) and its scales to signed 8
    bits against the largest of each super-block: ``d``, ``sc`` ``[super-blocks, per]``, codes."""
    scales, L = make_qx_quants(x, 32, weights)
    scales = scales.view(-1, per)
    top, amax = _first_max_abs(scales)
    live = amax >= GROUP_MAX_EPS
    iscale = -_f32(128) / torch.where(live, top, 1)
    sc = torch.where(live[:, None], torch.round(iscale[:, None] * scales).clamp(max=127), 0)
    d = torch.where(live, 1 / iscale, 0).to(torch.float16)
    return d, sc, torch.where(live.repeat_interleave(per)[:, None], L, 0)


def _on_stored_grid(t: GGMLType, x: torch.Tensor, shape: tuple[int, int], d, sc, L, dmin, mn) -> GGMLWeight:
    """A K-quant's fields in a ``[rows, cols]`` weight's layout, every weight rounded on the grid
    they store (``L``, the search's codes, where a sub-block's step is zero)."""
    rows, cols = shape
    nb = cols // QK_K
    d, sc = d.view(rows, nb), sc.reshape(rows, -1).to(torch.int32)
    if dmin is not None:
        dmin, mn = dmin.view(rows, nb), mn.reshape(rows, -1).to(torch.int32)
    a, b = grid_step_offset(t, d, dmin, sc, mn)
    codes = _round_to_grid(t, x, a.reshape(-1), b.reshape(-1) if b is not None else None, L)
    return GGMLWeight(t, codes.view(rows, cols).to(torch.uint8), d, dmin, sc, mn)


def _k_quant(t: GGMLType, w: torch.Tensor) -> GGMLWeight:
    rows, cols = w.shape
    nb, per = cols // QK_K, QK_K // t.sub
    x = w.reshape(rows * nb * per, t.sub)
    dmin = mn = None
    if t.name in ("q2_k", "q4_k", "q5_k"):
        if t.name == "q2_k":
            weights = x.abs()
            scales, mins, L = make_qkx2_quants(x, weights, 3, -0.5, 0.1, 15, True)
            levels = 15
        else:
            sum_x2 = _sequential_sum(x * x)
            # sqrtf is correctly rounded; torch's fp32 sqrt can be one ulp off, its fp64 one is not
            weights = torch.sqrt((sum_x2 / _f32(32)).double()).float()[:, None] + x.abs()
            nmax, rmin, nstep = (15, -1.0, 20) if t.name == "q4_k" else (31, -0.5, 15)
            scales, mins, L = make_qkx2_quants(x, weights, nmax, rmin, 0.1, nstep, False)
            levels = 63
        scales, mins = scales.view(rows * nb, per), mins.view(rows * nb, per)
        # the reference starts both maxima at +0 (a flat block must not store a −0 scale)
        max_scale = scales.max(dim=1).values
        max_scale = torch.where(max_scale > 0, max_scale, 0)
        max_min = mins.max(dim=1).values
        max_min = torch.where(max_min > 0, max_min, 0)
        inv_scale = torch.where(max_scale > 0, _f32(levels) / torch.where(max_scale > 0, max_scale, 1), 0)
        inv_min = torch.where(max_min > 0, _f32(levels) / torch.where(max_min > 0, max_min, 1), 0)
        sc = torch.round(inv_scale[:, None] * scales).clamp(max=levels)
        mn = torch.round(inv_min[:, None] * mins).clamp(max=levels)
        d = (max_scale / _f32(levels)).to(torch.float16)
        dmin = (max_min / _f32(levels)).to(torch.float16)
    elif t.name == "q3_k":
        scales, L = make_q3_quants(x)
        scales = scales.view(rows * nb, per)
        top, _ = _first_max_abs(scales)
        nonzero = top != 0
        iscale = -_f32(32) / torch.where(nonzero, top, 1)
        sc = torch.where(nonzero[:, None], _clamp_round(iscale[:, None] * scales, -32, 31), -32)
        d = torch.where(nonzero, 1 / iscale, 0).to(torch.float16)
    else:
        d, sc, L = _q6_k_fit(x, None, per)
    return _on_stored_grid(t, x, (rows, cols), d, sc, L, dmin, mn)


def _legacy(t: GGMLType, w: torch.Tensor) -> GGMLWeight:
    import gguf

    from ...formats.ggml import unpack

    data = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType(t.type_id))
    return unpack(t, torch.from_numpy(data), w.shape[1])


def reference_quantize(weight: torch.Tensor, type_name: str) -> GGMLWeight:
    """``weight`` ``[rows, cols]`` as llama.cpp's quantizer writes it (no importance matrix); the
    type falls back as llama.cpp's does when ``cols`` is not a whole number of its blocks."""
    from ...formats.ggml import type_for_width

    w = weight.detach().to(_F).contiguous()
    t = type_for_width(type_name, w.shape[1])
    return _k_quant(t, w) if t.k_quant else _legacy(t, w)


# -- with an importance matrix ---------------------------------------------------------------

def _sqrtf(v: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(v.double()).float()   # correctly rounded, as C's sqrtf


def _importance_weights(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """llama.cpp's per-weight importance ``qw·√(σ² + x²)``: the input's mean square times the
    weight's magnitude, softened by the block's spread ``σ²`` (``x`` ``[N, n]``, ``sigma2`` ``[N]``)."""
    return qw * _sqrtf(sigma2[:, None] + x * x)


def _legacy_with_importance(t: GGMLType, w: torch.Tensor, importance: torch.Tensor) -> GGMLWeight:
    """``quantize_row_q{4,5}_{0,1}_impl``: σ² over the whole row, one searched scale per block of
    32 and its codes kept as found (these types store an fp16 scale, no second rounding)."""
    rows, cols = w.shape
    nb = cols // t.block
    sigma2 = (_sequential_sum(w * w) / _f32(cols)).repeat_interleave(nb)
    x = w.reshape(rows * nb, t.block)
    weights = _importance_weights(x, importance.reshape(1, nb, t.block).expand(rows, -1, -1).reshape(-1, t.block), sigma2)
    dmin = None
    if t.zero is not None:
        d, L = make_qx_quants(x, t.zero, weights)
    else:
        d, the_min, L = make_qkx2_quants(x, weights, t.max_code, -0.9, 0.05, 36, False)
        dmin = (-the_min).to(torch.float16).view(rows, nb)
    return GGMLWeight(t, L.view(rows, cols).to(torch.uint8), d.to(torch.float16).view(rows, nb), dmin)


def _k_quant_with_importance(t: GGMLType, w: torch.Tensor, importance: torch.Tensor) -> GGMLWeight:
    """``quantize_row_q{2..6}_K_impl``: sub-block scales searched with the importance weights,
    then the sub-block scales (and minima) themselves fitted with the sub-blocks' total importance
    as weights (``make_qp_quants``/``make_qx_quants``) instead of against the largest."""
    rows, cols = w.shape
    nb, per = cols // QK_K, QK_K // t.sub
    x = w.reshape(rows * nb * per, t.sub)
    qw = importance.reshape(1, nb * per, t.sub).expand(rows, -1, -1).reshape(-1, t.sub)
    # σ² per super-block: Q2_K uses the mean square, Q3_K..Q5_K twice it; Q6_K uses qw alone
    sum_x2 = _sequential_sum((w * w).reshape(rows * nb, QK_K))
    sigma2 = (sum_x2 if t.name == "q2_k" else _f32(2) * sum_x2) / _f32(QK_K)
    weights = qw if t.name == "q6_k" else _importance_weights(x, qw, sigma2.repeat_interleave(per))
    sw = _sequential_sum(weights).view(rows * nb, per)
    dmin = mn = None
    if t.zero is None:   # q2_k, q4_k, q5_k
        scales, mins, L = make_qkx2_quants(x, weights, t.max_code, -0.9, 0.05, 36, False)
        levels = 15 if t.name == "q2_k" else 63
        d, sc = make_qp_quants(scales.view(rows * nb, per), levels, sw)
        dm, mn = make_qp_quants(mins.view(rows * nb, per), levels, sw)
        d, dmin = d.to(torch.float16), dm.to(torch.float16)
    elif t.name == "q3_k":
        scales, L = make_qx_quants(x, 4, weights)
        d, ls = make_qx_quants(scales.view(rows * nb, per), 32, sw)
        d, sc = d.to(torch.float16), ls - 32
    else:   # q6_k: as without importance, the search weighted by qw
        d, sc, L = _q6_k_fit(x, weights, per)
    return _on_stored_grid(t, x, (rows, cols), d, sc, L, dmin, mn)


def importance_quantize(weight: torch.Tensor, type_name: str, importance: torch.Tensor) -> GGMLWeight:
    """``weight`` ``[rows, cols]`` as ``llama-quantize --imatrix`` writes it: ``importance``
    ``[cols]`` is llama.cpp's importance matrix for this tensor, each input's mean square over the
    calibration tokens (any positive multiple gives the same result). ``Q8_0`` has no importance
    search in llama.cpp and is quantized as without one."""
    from ...formats.ggml import type_for_width

    w = weight.detach().to(_F).contiguous()
    qw = importance.detach().to(_F).reshape(-1)
    if qw.numel() != w.shape[1]:
        raise ValueError(f"importance has {qw.numel()} entries for rows of {w.shape[1]} weights")
    t = type_for_width(type_name, w.shape[1])
    if t.k_quant:
        return _k_quant_with_importance(t, w, qw)
    return _legacy(t, w) if t.name == "q8_0" else _legacy_with_importance(t, w, qw)


class FixedGGMLGrid:
    """GPTQ's column quantizer on a grid fitted beforehand (``GGMLWeight``'s scales and minima):
    each processed column is rounded on its sub-block's stored step and offset."""

    reads_ahead = False   # the grid is fixed: the solver's block need not be up to date

    def __init__(self, fitted: GGMLWeight, order: torch.Tensor | None = None) -> None:
        t = fitted.type
        self.type = t
        a, b = fitted.step_and_offset()
        col_sub = torch.arange(fitted.codes.shape[1]) // t.sub
        if order is not None:
            col_sub = col_sub[order]
        self.col_sub = col_sub.tolist()
        self.a = a.T.contiguous()                          # [sub-blocks, rows]
        self.b = b.T.contiguous() if b is not None else None
        self.safe = torch.where(self.a == 0, torch.ones_like(self.a), self.a)

    def round(self, j: int, w: torch.Tensor, Wt=None, block=None) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.col_sub[j]
        a, safe = self.a[s], self.safe[s]
        t = self.type
        if t.zero is None:
            q = _clamp_round((w + self.b[s]) / safe, 0, t.max_code)
            value = a * q - self.b[s]
        else:
            q = _clamp_round(w / safe, -t.zero, t.max_code - t.zero) + t.zero
            value = a * (q - t.zero)
        return q, value

    def bounds(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.col_sub[j]
        a, t = self.a[s], self.type
        if t.zero is None:
            lo, hi = -self.b[s], a * t.max_code - self.b[s]
        else:
            lo, hi = a * (0 - t.zero), a * (t.max_code - t.zero)
        return torch.minimum(lo, hi), torch.maximum(lo, hi)


def _more_bits(index: int, count: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third between."""
    return index < count // 8 or index >= 7 * count // 8 or (index - count // 8) % 3 == 2


def mixture_overrides(mixture: str, blocks: str, n_blocks: int, linears: list[str]) -> dict[str, dict]:
    """Per-module ``overrides`` reproducing llama.cpp's tensor-type choice for ``mixture`` (only
    ``q4_k_m`` so far: ``Q6_K`` for the value and down projections of the layers ``use_more_bits``
    picks, ``Q4_K`` elsewhere; its ``Q6_K`` output head is not a decoder linear, see the GGUF page)."""
    if mixture != "q4_k_m":
        raise ValueError(f"unknown mixture {mixture!r}")
    wide = [n for n in linears if n.rsplit(".", 1)[-1] in ("v_proj", "down_proj")]
    # an expert pattern (experts.*.down_proj) stands for every expert's
    return {"^" + re.escape(f"{blocks}.{i}.{name}").replace(r"\*", r"\d+") + "$": {"grid": "q6_k"}
            for i in range(n_blocks) if _more_bits(i, n_blocks) for name in wide}

