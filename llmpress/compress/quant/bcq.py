"""Binary-coding quantization (BCQ) with power-of-two scales: ShiftAddLLM's quantizer.

A weight is ``Σ_t α_t · b_t`` with ``b_t ∈ {−1, +1}`` (one bit-plane per bit) and scales ``α_t``
rounded to sums of ``terms`` signed powers of two (APoT), so dequantization and the lookup-table
GEMV need shifts and adds only. Scales are shared by a block of ``col_block`` input columns ×
``out/row_groups`` output rows (the paper's "Lat." layout: 8 columns × N/8 rows), which is what
lets BCQ sit inside GPTQ's column loop: the scales of a block are fitted when the loop reaches the
block's first column (weight objective, alternating least squares), every column is then coded
against them and its error fed forward (output objective): the paper's multi-objective solve.

Restated from the paper (arXiv 2406.05981) and research/algos-factorization.md §4; the greedy
init and alternating refinement are Xu et al. 2018's.
"""

from __future__ import annotations

import functools

import torch

from ...formats.bcq import BCQWeight, apot_value
from .gptq import damped_inverse_cholesky


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


def _layout(out: int, inp: int, col_block: int, row_groups: int) -> tuple[int, int]:
    if out % row_groups:
        raise ValueError(f"{out} output rows do not split into {row_groups} row groups")
    return row_groups, -(-inp // col_block)


def bcq_quantize(weight: torch.Tensor, hessian: torch.Tensor | None, *, bits: int, col_block: int = 8,
                 row_groups: int = 8, rounds: int = 15, terms: int = 3, damp: float = 0.01,
                 block_size: int = 128) -> BCQWeight:
    """BCQ of ``W [out, in]``: with ``hessian``, inside GPTQ's column loop (error feedback through
    the inverse Hessian's Cholesky factor, lazy blocks); without, data-free (weight objective)."""
    W = weight.to(torch.float64).clone()
    out, inp = W.shape
    row_groups, col_blocks = _layout(out, inp, col_block, row_groups)
    rows_per = out // row_groups
    exps = torch.zeros(bits, row_groups, col_blocks, terms, dtype=torch.int8)
    asigns = torch.zeros_like(exps)
    signs = torch.zeros(bits, out, inp, dtype=torch.bool)
    upper = None
    if hessian is not None:
        upper = damped_inverse_cholesky(hessian.to(torch.float64), damp)[0]
    if block_size % col_block:
        block_size = col_block * max(1, block_size // col_block)
    for i1 in range(0, inp, block_size):
        i2 = min(i1 + block_size, inp)
        W1 = W[:, i1:i2].clone()
        errors = torch.zeros_like(W1)
        for j in range(i2 - i1):
            col = i1 + j
            if col % col_block == 0:   # the scales of the block that starts here, from current weights
                c = col // col_block
                slab = W1[:, j:j + col_block].reshape(row_groups, rows_per * min(col_block, i2 - col))
                alpha = fit_bcq(slab, bits, rounds, terms)
                _, e, s = apot_round(alpha, terms)
                exps[:, :, c], asigns[:, :, c] = e.permute(1, 0, 2), s.permute(1, 0, 2)
                group_alpha = apot_value(e, s).repeat_interleave(rows_per, 0)    # [out, q]
            w = W1[:, j]
            codes = nearest_codes(w.unsqueeze(-1), group_alpha).squeeze(-2)   # [out, q]
            signs[:, :, col] = (codes > 0).T
            value = (codes * group_alpha).sum(-1)
            if upper is None:
                W1[:, j] = value
                continue
            err = (w - value) / upper[col, col]
            W1[:, j:] -= err.unsqueeze(1) * upper[col, col:i2].unsqueeze(0)
            W1[:, j] = value
            errors[:, j] = err
        W[:, i1:i2] = W1
        if upper is not None:
            W[:, i2:] -= errors @ upper[i1:i2, i2:]
    return BCQWeight(signs, exps, asigns, col_block)
