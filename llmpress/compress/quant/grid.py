"""The uniform integer grid shared by RTN and the GPTQ family.

Conventions follow the GPTQ reference quantizer:
the range always contains zero, an all-zero row gets [-1, 1], asymmetric zeros are
``round(-xmin / s)``, symmetric grids put the zero at ``(maxq + 1) / 2``.
Codes are unsigned integers in ``[0, 2^bits - 1]``; ``w ≈ s * (q - z)``.

Scales are rounded to fp16 when they are fitted, because that is how they are stored:
the solver then compensates exactly the error of the weights that will be evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GridParams:
    """Per-row scale and zero of one group of columns (each of shape ``[rows]``)."""

    scale: torch.Tensor
    zero: torch.Tensor


def max_code(bits: int) -> int:
    return (1 << bits) - 1


def _range_to_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool) -> GridParams:
    maxq = max_code(bits)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(both_zero, torch.full_like(xmax, 1.0), xmax)
    scale = ((xmax - xmin) / maxq).to(torch.float16).to(torch.float32)
    # fp16 may flush a tiny scale to zero: keep it representable instead of dividing by zero.
    scale = torch.where(scale > 0, scale, torch.full_like(scale, torch.finfo(torch.float16).tiny))
    if sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return GridParams(scale=scale, zero=zero)


def quantize_codes(w: torch.Tensor, params: GridParams, bits: int) -> torch.Tensor:
    """Integer codes of ``w`` (``[rows, cols]`` or ``[rows]``) on the grid, as float values."""
    scale, zero = params.scale, params.zero
    if w.dim() == 2:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    return torch.clamp(torch.round(w / scale) + zero, 0, max_code(bits))


def dequantize_codes(q: torch.Tensor, params: GridParams) -> torch.Tensor:
    scale, zero = params.scale, params.zero
    if q.dim() == 2:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    return scale * (q - zero)


def fake_quantize(w: torch.Tensor, params: GridParams, bits: int) -> torch.Tensor:
    return dequantize_codes(quantize_codes(w, params, bits), params)


def fit_grid(
    w: torch.Tensor,
    bits: int,
    sym: bool,
    mse: bool = False,
    *,
    norm: float = 2.4,
    grid: int = 100,
    max_shrink: float = 0.8,
) -> GridParams:
    """Fit one scale and zero per row of ``w`` (``[rows, cols]``) from its min and max.

    With ``mse`` the range is shrunk by ``p = 1 - i/grid`` for ``i < max_shrink * grid`` and the
    candidate with the smallest ``sum |Q(w) - w|^norm`` is kept per row (the reference's
    ``mse=True``, QuaRot's ``w_clip``).
    """
    w = w.to(torch.float32)
    zeros = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zeros)
    xmax = torch.maximum(w.max(dim=1).values, zeros)
    best = _range_to_params(xmin, xmax, bits, sym)
    if not mse:
        return best
    best_err = torch.full_like(xmin, float("inf"))
    best_scale, best_zero = best.scale.clone(), best.zero.clone()
    for i in range(int(max_shrink * grid)):
        p = 1 - i / grid
        cand = _range_to_params(p * xmin, p * xmax, bits, sym)
        err = (fake_quantize(w, cand, bits) - w).abs().pow(norm).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, cand.scale, best_scale)
        best_zero = torch.where(better, cand.zero, best_zero)
    return GridParams(scale=best_scale, zero=best_zero)


def grouped_fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """RTN of ``w`` on a min-max grid per row or per group of ``group_size`` columns (the last group
    of a width that does not divide may be narrower)."""
    rows, cols = w.shape
    if group_size <= 0 or cols % group_size:
        g = cols if group_size <= 0 else group_size
        out = torch.empty_like(w)
        for s in range(0, cols, g):
            params = fit_grid(w[:, s:s + g], bits, sym)
            out[:, s:s + g] = fake_quantize(w[:, s:s + g], params, bits)
        return out
    flat = w.reshape(-1, group_size)
    return fake_quantize(flat, fit_grid(flat, bits, sym), bits).reshape(rows, cols)
