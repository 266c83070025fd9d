"""Round-to-nearest: the data-free baseline."""

from __future__ import annotations

from typing import Literal

import torch

from ...formats.uniform import QuantizedWeight, group_count
from ...layers import GGMLLinear, QuantLinear
from ..stage import GridQuantStage, register
from .ggml_grid import importance_quantize, reference_quantize
from .grid import fit_grid, quantize_codes


def rtn_quantize(
    weight: torch.Tensor, *, bits: int, group_size: int = -1, sym: bool = False, mse: bool = False
) -> QuantizedWeight:
    """Quantize each row (or each group of ``group_size`` input columns; the last may be ragged)."""
    w = weight.detach().to(torch.float32)
    rows, cols = w.shape
    n_groups = group_count(cols, group_size)
    step = cols if n_groups == 1 else group_size
    codes = torch.empty_like(w)
    scales = torch.empty(rows, n_groups)
    zeros = torch.empty(rows, n_groups)
    for g in range(n_groups):
        sl = slice(g * step, min((g + 1) * step, cols))
        params = fit_grid(w[:, sl], bits, sym, mse)
        codes[:, sl] = quantize_codes(w[:, sl], params, bits)
        scales[:, g], zeros[:, g] = params.scale, params.zero
    return QuantizedWeight(
        codes=codes.to(torch.int64), scales=scales, zeros=zeros, g_idx=None,
        bits=bits, group_size=group_size, sym=sym,
    )


# -- the method ------------------------------------------------------------------------------

class RTNStage(GridQuantStage):
    """Round-to-nearest, per row or per group; data-free. On a GGML grid it is llama.cpp's own
    quantizer: without an importance matrix (``ggml_grid.reference_quantize``), or with
    ``imatrix: true`` ``llama-quantize --imatrix`` (``ggml_grid.importance_quantize``, which then
    reads the calibration data)."""

    method: Literal["rtn"] = "rtn"

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"hessian"}) if self.fits_with_importance else frozenset()


def _compress(stage: RTNStage, weight: torch.Tensor, stats: dict, bias, dtype):
    if stage.fits_with_importance:
        fitted = importance_quantize(weight, stage.grid, torch.diagonal(stats["hessian"]))
        return GGMLLinear.from_weight(fitted, bias, dtype), {}
    if stage.grid != "uniform":
        return GGMLLinear.from_weight(reference_quantize(weight, stage.grid), bias, dtype), {}
    q = rtn_quantize(weight, bits=stage.bits, group_size=stage.group_size, sym=stage.sym, mse=stage.mse)
    return QuantLinear.from_quantized(q, bias, dtype), q.metrics


register(RTNStage, compress=_compress)
