"""GPTQ (Frantar et al., ICLR 2023), restated from the paper and research/algos-quant.md §1.

Per layer, minimise ``||(Ŵ - W) X||²`` column by column in a fixed order: quantize column j,
spread its error over the columns not yet quantized through the upper Cholesky factor ``U`` of
the damped inverse Hessian (``(H + λI)^-1 = UᵀU``), and apply the updates lazily, one GEMM per
block of ``block_size`` columns.

Where this departs from the reference, on purpose:
- dead input channels (``H_jj == 0``) keep their original weights, quantized to the grid, where
  the reference zeros them; the calibration objective is identical (the column sees no input)
  but inference on inputs that do reach the channel is not broken (research pitfall 1.7.2);
- scales are rounded to fp16 when fitted (how they are stored), so the error feedback
  compensates the weights that are actually evaluated;
- Cholesky failures retry with damping raised by 0.01 (GPTQModel's rule) instead of crashing.
Kept as in the reference: dynamic group parameters are fitted on the outer, lazily updated
``W`` slice (pitfall 1.7.3; exact when ``group_size`` divides ``block_size``).
"""

from __future__ import annotations

import torch

from ...errors import LlmpressError
from .grid import dequantize_codes, fit_grid, group_count, quantize_codes
from .result import QuantizedWeight


class HessianError(LlmpressError):
    pass


def damped_inverse_cholesky(
    hessian: torch.Tensor, damp: float, *, max_damp: float = 1.0
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp·mean(diag H)·I)^-1`` and the damping that worked."""
    if not torch.isfinite(hessian).all():
        raise HessianError("the Hessian has NaN or Inf entries: the calibration activations overflowed")
    n = hessian.shape[0]
    mean_diag = torch.diagonal(hessian).mean()
    eye = torch.eye(n, dtype=hessian.dtype, device=hessian.device)
    current = damp
    while current <= max_damp + 1e-9:
        chol, info = torch.linalg.cholesky_ex(hessian + current * mean_diag * eye)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if info == 0 and torch.isfinite(upper).all():
                return upper, current
        current += 0.01
    raise HessianError(
        f"the Hessian is not positive definite even with damping {max_damp}: "
        "add calibration samples or raise `damp`"
    )


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    group_size: int = -1,
    sym: bool = False,
    mse: bool = False,
    act_order: bool = False,
    static_groups: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
) -> QuantizedWeight:
    """Quantize ``weight`` ``[out, in]`` given ``hessian`` ``[in, in]`` (∝ X Xᵀ of its inputs)."""
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(torch.float32).clone()
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise HessianError(f"Hessian of shape {tuple(H.shape)} does not match a weight of {cols} inputs")

    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    n_groups = group_count(cols, group_size)
    grouped = group_size > 0

    row_params = None if grouped else fit_grid(W, bits, sym, mse)
    static = None
    if grouped and static_groups:
        static = [fit_grid(W[:, g * group_size:(g + 1) * group_size], bits, sym, mse) for g in range(n_groups)]

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]

    U, used_damp = damped_inverse_cholesky(H, damp)
    del H

    # Work on Wᵀ so that a column of W is a contiguous row: the per-column rank-1 updates then
    # run on contiguous memory (about 3x faster on CPU than on strided column slices).
    Wt = W.T.contiguous()
    del W
    codes_t = torch.zeros(cols, rows)
    scales = torch.zeros(rows, n_groups)
    zeros = torch.zeros(rows, n_groups)
    position_group = torch.zeros(cols, dtype=torch.int64)   # group of each processed position
    loss = 0.0
    params = row_params
    if params is not None:
        scales[:, 0], zeros[:, 0] = params.scale, params.zero
    if static is not None:
        for g, p in enumerate(static):
            scales[:, g], zeros[:, g] = p.scale, p.zero
    order = perm.tolist() if perm is not None else None

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = Wt[i1:i2].clone()                      # [count, rows]: row i is column i1+i of W
        err_block = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        diag = torch.diagonal(U1).tolist()
        for i in range(i2 - i1):
            j = i1 + i
            if grouped:
                if static is not None:
                    g = (order[j] if order is not None else j) // group_size
                    params = static[g]
                elif j % group_size == 0:
                    g = j // group_size
                    # fitted on the outer, lazily updated weights (reference behaviour, see above)
                    params = fit_grid(Wt[j:j + group_size].T, bits, sym, mse)
                    scales[:, g], zeros[:, g] = params.scale, params.zero
                position_group[j] = g
            w = W1[i]
            q = quantize_codes(w, params, bits)
            codes_t[j] = q
            err = (w - dequantize_codes(q, params)) / diag[i]
            W1[i:].addr_(U1[i, i:], err, alpha=-1.0)
            err_block[i] = err
        loss += float(err_block.double().pow(2).sum()) / 2
        Wt[i2:].addmm_(U[i1:i2, i2:].T, err_block, alpha=-1.0)
    codes = codes_t.T

    g_idx = None
    if perm is not None:
        inverse = torch.argsort(perm)
        codes = codes[:, inverse]
        if grouped and static is None:
            g_idx = position_group[inverse].to(torch.int32)
    return QuantizedWeight(
        codes=codes.to(torch.int64), scales=scales, zeros=zeros, g_idx=g_idx,
        bits=bits, group_size=group_size, sym=sym,
        metrics={"gptq_loss": float(loss), "damp": used_damp, "dead_inputs": int(dead.sum())},
    )
