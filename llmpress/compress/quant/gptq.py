"""GPTQ (Frantar et al., ICLR 2023), restated from the paper; GPTAQ and ResComp as its residual
mode (docs/methods/gptq.md and gptaq-rescomp.md, with where we depart from the reference: dead
inputs kept, fp16 scales at fit time, damping retries, an in-place inverse factor).

``solve_columns`` is the column loop: per column quantize, spread the error over the later columns
through the upper Cholesky factor ``U`` of the damped inverse Hessian, lazily per block. Any
column quantizer plugs in (the uniform grid here, BCQ and DSQ). Dynamic group parameters are
fitted on the outer, lazily updated ``W`` slice, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from ...formats.uniform import QuantizedWeight, group_count
from ...layers import GGMLLinear, QuantLinear
from ..phases import add_flops
from ..stage import GridQuantStage, register
from .ggml_grid import FixedGGMLGrid, importance_quantize, reference_quantize
from .grid import dequantize_codes, fit_grid, max_code, quantize_codes
from .hessian import HessianError, damped_inverse_cholesky


@dataclass(frozen=True)
class Residual:
    """What turns GPTQ into GPTAQ (and GPTAQ+ResComp): the inputs' residual statistics.

    ``cross`` is ``ΔX·Xᵀ`` with ``ΔX = X̃ − X``: full-precision-stream inputs minus the inputs the
    partially compressed model gives the layer, on the same tokens, scaled like the Hessian.
    ``alpha`` scales GPTAQ's term (the paper has no coefficient, i.e. 1; its code uses 0.25).
    ``rescomp`` adds ResComp's compensation-aware term ``(W⁰ − W)·R`` with ``R`` built from
    ``X̃Xᵀ``, scaled by ``alpha2`` (0.25 in its code). ``form="delta"`` builds ``R`` from ``ΔX·Xᵀ``
    instead: GPTQ's own error feedback already aligns ``(W⁰ − W)·X``, only ``(W⁰ − W)·ΔX`` is new
    (ours, see docs/methods/gptaq-rescomp.md; it reduces to GPTQ when ``X̃ = X``, the paper's form does not).
    ``mode`` is ResComp's: ``org`` updates a
    column's own value to its code and feeds the codes into the lazy update (GPTAQ's code
    behaviour); ``allw`` keeps the compensated values and clamps them to the group's grid range.
    """

    cross: torch.Tensor
    alpha: float = 0.25
    rescomp: bool = False
    alpha2: float = 0.25
    form: Literal["paper", "delta"] = "paper"
    mode: Literal["org", "allw"] = "org"


def residual_projection(cross: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """``striu(cross·Uᵀ)·U`` (GPTAQ Thm 4.2), with ``(H + λI)^-1 = UᵀU``.

    Row ``j`` equals ``cross[j, j+1:] · inv(H_λ[j+1:, j+1:])`` on columns ``> j`` and is zero
    elsewhere: how the columns after ``j`` best absorb the output ``w_j · cross[j]`` of input ``j``
    once the columns up to ``j`` are fixed; all rows for the price of two matmuls.
    """
    return torch.triu(cross @ upper.T, diagonal=1) @ upper


SUB_BLOCK = 16         # columns per inner lazy batch of solve_columns
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
    residual: Residual | None = None,
) -> QuantizedWeight:
    """Quantize ``weight`` ``[out, in]`` given ``hessian`` ``[in, in]`` (∝ X Xᵀ of its inputs).

    ``residual`` turns GPTQ into GPTAQ or GPTAQ+ResComp (see :class:`Residual`).
    """
    W = weight.detach().to(torch.float32)
    rows, cols = W.shape
    n_groups = group_count(cols, group_size)
    grouped = group_size > 0
    row_params = None if grouped else fit_grid(W, bits, sym, mse)
    static = None
    if grouped and static_groups:
        static = [fit_grid(W[:, g * group_size:(g + 1) * group_size], bits, sym, mse) for g in range(n_groups)]
    perm = act_order_permutation(hessian) if act_order else None
    scales = torch.zeros(rows, n_groups, device=W.device)
    zeros = torch.zeros(rows, n_groups, device=W.device)
    if row_params is not None:
        scales[:, 0], zeros[:, 0] = row_params.scale, row_params.zero
    if static is not None:
        for g, p in enumerate(static):
            scales[:, g], zeros[:, g] = p.scale, p.zero
    grid = _ColumnGrid(group_size, bits, sym, mse, static, perm.tolist() if perm is not None else None,
                       scales, zeros, torch.zeros(cols, dtype=torch.int64, device=W.device), row_params)
    solved = solve_columns(W, hessian, grid, order=perm, damp=damp, block_size=block_size, residual=residual)
    g_idx = None
    if perm is not None and grouped and static is None:
        g_idx = grid.position_group[torch.argsort(perm)].to(torch.int32)
    return QuantizedWeight(
        codes=solved.codes.to(torch.int64), scales=scales, zeros=zeros, g_idx=g_idx,
        bits=bits, group_size=group_size, sym=sym, metrics=solved.metrics,
    )


def act_order_permutation(hessian: torch.Tensor) -> torch.Tensor:
    """Columns by decreasing ``H_jj`` (dead columns count as 1, the value the solver gives them)."""
    diag = torch.diagonal(hessian).to(torch.float32).clone()
    diag[diag == 0] = 1.0
    return torch.argsort(diag, descending=True)


@dataclass
class Solved:
    """What the column loop returns: each weight's code ``[out, in]`` in the original column
    order (whatever the column quantizer's codes mean) and the solve's metrics."""

    codes: torch.Tensor
    metrics: dict[str, float]


def solve_columns(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid,
    *,
    order: torch.Tensor | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    residual: Residual | None = None,
) -> Solved:
    """GPTQ's column loop with any column quantizer ``grid``: ``grid.round(j, w, Wt, block)`` returns
    the codes and values of processed column ``j`` (current values ``w``; for fitting a group when
    its first column is reached, ``Wt`` the transposed, lazily updated weights and ``block`` the
    current block ``(i1, W1)``, whose rows are fully updated) and ``grid.bounds(j)`` the range
    ResComp's ``allw`` mode clamps to. ``order`` permutes the columns (act-order)."""
    W = weight.detach().to(torch.float32).clone()
    rows, cols = W.shape
    if hessian.shape != (cols, cols):
        raise HessianError(f"Hessian of shape {tuple(hessian.shape)} does not match a weight of {cols} inputs")

    dead = torch.diagonal(hessian) == 0
    cross = None
    if residual is not None:
        if residual.cross.shape != (cols, cols):
            raise HessianError(f"ΔX·Xᵀ of shape {tuple(residual.cross.shape)} does not match {cols} inputs")
        # D and C = H + D are taken before H is damped (reference order).
        D = residual.cross.detach().to(torch.float32).clone()
        D[:, dead] = 0.0
        if residual.rescomp:
            C = hessian.to(torch.float32) + D if residual.form == "paper" else D.clone()
        else:
            C = None
    # One copy of H, permuted as it is taken (an 8B down_proj's H is 822 MB).
    H = hessian.detach().to(torch.float32)
    H = H[order[:, None], order] if order is not None else H.clone()
    dead_in_order = dead[order] if order is not None else dead
    H[dead_in_order, dead_in_order] = 1.0

    if order is not None:
        W = W[:, order]
        if residual is not None:
            D = D[order][:, order]
            C = C[order][:, order] if C is not None else None

    U, used_damp = damped_inverse_cholesky(H, damp)
    del H
    # potrf + trtri (n³/3 each), then the lazy-batch updates of the later columns (rows·n²).
    add_flops(2.0 * cols**3 / 3 + float(rows) * cols**2 + (8.0 * cols**3 if residual is not None else 0.0))
    if residual is not None:
        # P: GPTAQ's correction of the later columns for the residual of each input; R: the same
        # for ResComp's C (X̃Xᵀ in the paper's form, ΔXXᵀ in ours).
        P = residual.alpha * residual_projection(D, U)
        R = residual.alpha2 * residual_projection(C, U) if C is not None else None
        cross = (P, R)
        del D, C

    # Work on Wᵀ so that a column of W is a contiguous row: the per-column rank-1 updates then
    # run on contiguous memory (about 3x faster on CPU than on strided column slices).
    Wt = W.T.contiguous()
    del W
    codes_t = torch.zeros(cols, rows, device=Wt.device)
    loss = 0.0
    if cross is not None:
        P, R = cross
        W0t = Wt.clone() if R is not None else None   # the layer's weights before any update
        allw = R is not None and residual.mode == "allw"

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = Wt[i1:i2].clone()                      # [count, rows]: row i is column i1+i of W
        err_block = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        diag = torch.diagonal(U1).tolist()
        if cross is not None:
            _residual_block(Wt, W1, err_block, U, P, R, W0t, i1, i2, codes_t, grid, allw)
            loss += float(err_block.double().pow(2).sum()) / 2
            continue
        # Within the lazy block, a second level of lazy batches: a column's error reaches the
        # next columns of its sub-block at once and the rest of the block in one GEMM per
        # sub-block (the per-column rank-1 update of the whole block was most of the loop's time
        # on CPU). A grid that fits on the block's later rows (BCQ, DSQ) needs them updated: it
        # keeps one sub-block per block.
        step = (i2 - i1) if getattr(grid, "reads_ahead", True) else SUB_BLOCK
        for s1 in range(0, i2 - i1, step):
            s2 = min(s1 + step, i2 - i1)
            for i in range(s1, s2):
                j = i1 + i
                w = W1[i]
                codes_t[j], value = grid.round(j, w, Wt, (i1, W1))
                err = err_block[i]
                torch.sub(w, value, out=err).div_(diag[i])
                if i + 1 < s2:
                    W1[i + 1:s2].addr_(U1[i, i + 1:s2], err, alpha=-1.0)
            if s2 < i2 - i1:
                W1[s2:].addmm_(U1[s1:s2, s2:].T, err_block[s1:s2], alpha=-1.0)
        loss += float(err_block.double().pow(2).sum()) / 2
        Wt[i2:].addmm_(U[i1:i2, i2:].T, err_block, alpha=-1.0)
    codes = codes_t.T
    if order is not None:
        codes = codes[:, torch.argsort(order)]
    return Solved(codes, {"gptq_loss": float(loss), "damp": used_damp, "dead_inputs": int(dead.sum())})


@dataclass
class _ColumnGrid:
    """The grid of each processed column: static groups (looked up through the act-order
    permutation), or dynamic groups fitted when the loop reaches a group's first column, on the
    outer, lazily updated weights (reference behaviour, see the module docstring)."""

    group_size: int
    bits: int
    sym: bool
    mse: bool
    static: list | None
    order: list[int] | None
    scales: torch.Tensor
    zeros: torch.Tensor
    position_group: torch.Tensor
    current: object = None   # the parameters in force; carried across lazy blocks
    reads_ahead = False      # fits on the outer weights only, never on the block's later rows

    def at(self, j: int, Wt: torch.Tensor):
        """The parameters for processed column ``j`` (columns are visited in order)."""
        if self.group_size <= 0:
            return self.current
        if self.static is not None:
            g = (self.order[j] if self.order is not None else j) // self.group_size
            self.current = self.static[g]
        elif j % self.group_size == 0:
            g = j // self.group_size
            self.current = fit_grid(Wt[j:j + self.group_size].T, self.bits, self.sym, self.mse)
            self.scales[:, g], self.zeros[:, g] = self.current.scale, self.current.zero
        else:
            g = j // self.group_size
        self.position_group[j] = g
        return self.current

    def round(self, j: int, w: torch.Tensor, Wt: torch.Tensor, block=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and dequantized values of processed column ``j`` with current values ``w`` (the
        group is fitted on ``Wt``, the reference's choice; ``block`` is unused)."""
        params = self.at(j, Wt)
        q = quantize_codes(w, params, self.bits)
        return q, dequantize_codes(q, params)

    def bounds(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest and largest value of the grid in force (after ``round(j, ...)``)."""
        params = self.current
        return params.scale * (0 - params.zero), params.scale * (max_code(self.bits) - params.zero)


def _residual_block(Wt, W1, err_block, U, P, R, W0t, i1, i2, codes_t, grid, allw) -> None:
    """One lazy block of GPTAQ (``R is None``) or GPTAQ+ResComp, on transposed weights ``Wt``.

    Per column ``j`` with current value ``w``, code value ``q`` and ``e = (w − q)/U_jj``, the later
    columns ``k`` of the block get ``−e·U_jk + w·P_jk + (W⁰_j − w)·R_jk``; after the block the
    columns past it get the same three terms in one GEMM each, with ``w`` replaced by the block's
    final values (the codes in ``org`` mode, the clamped compensated values in ``allw``).
    """
    U1, P1 = U[i1:i2, i1:i2], P[i1:i2, i1:i2]
    R1 = R[i1:i2, i1:i2] if R is not None else None
    diag = torch.diagonal(U1).tolist()
    final = torch.empty_like(W1)      # what the lazy update multiplies P (and R) with
    for i in range(i2 - i1):
        j = i1 + i
        w = W1[i].clone()
        codes_t[j], value = grid.round(j, w, Wt, (i1, W1))
        err = (w - value) / diag[i]
        err_block[i] = err
        start = i + 1 if allw else i          # 'org' also moves column j itself onto its code
        if R1 is None:
            coeffs = torch.stack([U1[i, start:], -P1[i, start:]], dim=1)
            vectors = torch.stack([err, w])
        else:
            coeffs = torch.stack([U1[i, start:], -P1[i, start:], -R1[i, start:]], dim=1)
            vectors = torch.stack([err, w, W0t[j] - w])
        W1[start:].addmm_(coeffs, vectors, alpha=-1.0)
        if allw:
            lo, hi = grid.bounds(j)
            final[i] = torch.minimum(torch.maximum(w, lo), hi)
        else:
            final[i] = W1[i]
    if i2 < Wt.shape[0]:
        Wt[i2:].addmm_(U[i1:i2, i2:].T, err_block, alpha=-1.0)
        Wt[i2:].addmm_(P[i1:i2, i2:].T, final)
        if R is not None:
            Wt[i2:].addmm_(R[i1:i2, i2:].T, W0t[i1:i2] - final)


# -- the method ------------------------------------------------------------------------------

class GPTQStage(GridQuantStage):
    """GPTQ with act-order, static groups, damping and true-sequential groups; with ``residual``
    also GPTAQ (asymmetric calibration) and GPTAQ+ResComp (compensation-aware error)."""

    method: Literal["gptq"] = "gptq"
    act_order: bool = True
    static_groups: bool = False
    true_sequential: bool = True
    damp: float = Field(0.01, gt=0, le=1)
    block_size: int = Field(128, ge=1)
    # none: GPTQ. gptaq: target the full-precision model's output (needs its input stream).
    # rescomp: gptaq plus ResComp's term for the compensated-versus-original weights.
    residual: Literal["none", "gptaq", "rescomp"] = "none"
    alpha: float = Field(0.25, ge=0)      # GPTAQ's coefficient (its code: 0.25; its paper: none, i.e. 1)
    alpha2: float = Field(0.25, ge=0)     # ResComp's coefficient (its code: 0.25)
    rescomp_form: Literal["paper", "delta"] = "paper"
    # allw: ResComp's consistent mode. auto: its code's rule (org at 2 bits, else allw), whose 'org'
    # lazy update over-compensates and made ResComp worse than GPTAQ at W2 (docs/notes/rescomp-w2.md).
    rescomp_mode: Literal["auto", "org", "allw"] = "allw"
    # on a GGML grid, fit the scales with llama.cpp's importance-matrix search before the solve
    # (llama.cpp's quantizer with an imatrix beat GPTQ on its plain grid; docs/methods/gguf.md)
    imatrix: bool = True

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"hessian", "fp_inputs"}) if self.residual != "none" else frozenset({"hessian"})

    @property
    def solves_on_device(self) -> bool:
        return self.grid == "uniform"   # the GGML grids' fits are CPU code


def residual_of(stage: GPTQStage, stats: dict, column_scale: torch.Tensor | None = None) -> Residual | None:
    """GPTAQ's (and ResComp's) residual statistics for ``stage``, in the inputs scaled by
    ``column_scale`` when the weight is solved as ``W·diag(1/c)``."""
    if stage.residual == "none":
        return None
    mode = stage.rescomp_mode
    if mode == "auto":   # ResComp's rule: its 'allw' mode can diverge at 2 bits
        mode = "org" if stage.bits == 2 else "allw"
    cross = stats["cross"]
    if column_scale is not None:
        cross = column_scale[:, None] * cross * column_scale[None, :]
    return Residual(cross, alpha=stage.alpha, rescomp=stage.residual == "rescomp", alpha2=stage.alpha2,
                    form=stage.rescomp_form, mode=mode)


def gptq_on_ggml_grid(weight: torch.Tensor, hessian: torch.Tensor, grid: str, *, act_order: bool = True,
                      damp: float = 0.01, block_size: int = 128, residual: Residual | None = None,
                      imatrix: bool = True):
    """GPTQ's column updates on a GGML grid fitted first by llama.cpp's own search (with
    ``imatrix`` its importance-matrix search, the importance being the Hessian's diagonal): the
    fp16 scales and quantized sub-block scales are fixed, the solve chooses only the codes.
    Returns the ``GGMLWeight`` and the solve's metrics."""
    import dataclasses

    if imatrix:
        fitted = importance_quantize(weight, grid, torch.diagonal(hessian))
    else:
        fitted = reference_quantize(weight, grid)
    perm = act_order_permutation(hessian) if act_order else None
    solved = solve_columns(weight, hessian, FixedGGMLGrid(fitted, perm), order=perm, damp=damp,
                           block_size=block_size, residual=residual)
    return dataclasses.replace(fitted, codes=solved.codes.to(torch.uint8)), solved.metrics


def _compress(stage: GPTQStage, weight: torch.Tensor, stats: dict, bias, dtype):
    if stage.grid != "uniform":
        fitted, metrics = gptq_on_ggml_grid(weight, stats["hessian"], stage.grid, act_order=stage.act_order,
                                            damp=stage.damp, block_size=stage.block_size,
                                            residual=residual_of(stage, stats), imatrix=stage.imatrix)
        return GGMLLinear.from_weight(fitted, bias, dtype), metrics
    q = gptq_quantize(
        weight, stats["hessian"], bits=stage.bits, group_size=stage.group_size, sym=stage.sym,
        mse=stage.mse, act_order=stage.act_order, static_groups=stage.static_groups,
        damp=stage.damp, block_size=stage.block_size, residual=residual_of(stage, stats),
    )
    return QuantLinear.from_quantized(q.to("cpu"), bias, dtype), q.metrics


register(GPTQStage, compress=_compress)
