"""``TTLinear``: a linear stored as tensor-train (TT-matrix) cores (compress/factor/tt.py).

Stored tensors (``<module>.<name>`` in safetensors): ``core0`` … ``core{d−1}``, each
``[r_{k−1}, m_k, n_k, r_k]`` in the model's dtype, and ``bias`` when the original linear had one.
The manifest holds ``out_modes``, ``in_modes`` and ``ranks``; ``Π m_k ≥ out_features`` and
``Π n_k ≥ in_features`` (zero padding, sliced at forward).

The forward contracts one core at a time (decoding, short inputs). For a call with many rows
(a 2048-token prefill) it forms the weight for that call only and runs one GEMM, when the
multiply-add count says that is cheaper: near full rank a contraction costs tens of dense rows,
and forming the weight costs a few rows. Nothing dense is kept between calls.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ..formats.tt import contraction_macs, reconstruction_macs, tt_forward, tt_full
from .base import CompressedLinear, Layout, value_dtype_for


class TTLinear(CompressedLinear):
    format_name = "tt"
    format_keys = ("in_features", "out_features", "out_modes", "in_modes", "ranks", "bias", "value_bits")
    format_defaults: ClassVar[dict[str, Any]] = {"value_bits": 32}   # folders from before fp16 cores stored fp32

    def __init__(self, in_features: int, out_features: int, *, out_modes: list[int], in_modes: list[int],
                 ranks: list[int], bias: bool, value_bits: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        d = len(out_modes)
        if not (2 <= d == len(in_modes) == len(ranks) - 1) or ranks[0] != 1 or ranks[-1] != 1 or min(ranks) < 1:
            raise ValueError(f"modes {out_modes}/{in_modes} and ranks {ranks} do not describe a TT-matrix")
        if math.prod(out_modes) < out_features or math.prod(in_modes) < in_features or min(out_modes + in_modes) < 1:
            raise ValueError(f"modes {out_modes}/{in_modes} do not cover a {out_features}x{in_features} weight")
        self.in_features, self.out_features = in_features, out_features
        self.out_modes, self.in_modes, self.ranks = list(out_modes), list(in_modes), list(ranks)
        for k in range(d):
            shape = (ranks[k], out_modes[k], in_modes[k], ranks[k + 1])
            self.register_buffer(f"core{k}", torch.zeros(shape, dtype=value_dtype_for(value_bits, dtype), device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.compute_dtype = dtype
        shapes = [(ranks[k], out_modes[k], in_modes[k], ranks[k + 1]) for k in range(d)]
        self._row_macs = (contraction_macs(shapes), reconstruction_macs(shapes), math.prod(out_modes) * math.prod(in_modes))

    @property
    def value_bits(self) -> int:
        """The width the cores are stored at."""
        return torch.finfo(self.core0.dtype).bits

    @property
    def cores(self) -> list[torch.Tensor]:
        return [getattr(self, f"core{k}") for k in range(len(self.out_modes))]

    @classmethod
    def from_cores(cls, cores: list[torch.Tensor], shape: tuple[int, int], bias: torch.Tensor | None,
                   dtype: torch.dtype, value_dtype: torch.dtype | None = None) -> TTLinear:
        """The layer that computes in ``dtype`` with its cores stored in ``value_dtype`` (``dtype``
        when None); the bias stays in ``dtype``."""
        layer = cls(shape[1], shape[0], out_modes=[c.shape[1] for c in cores], in_modes=[c.shape[2] for c in cores],
                    ranks=[1, *(c.shape[3] for c in cores)], bias=bias is not None, dtype=dtype)
        for k, core in enumerate(cores):
            setattr(layer, f"core{k}", core.to(value_dtype or dtype).contiguous())
        if bias is not None:
            layer.bias.copy_(bias.detach().to(dtype))
        return layer

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``[out, in]`` weight the cores represent (for calibration and export)."""
        return tt_full([c.to(dtype or self.compute_dtype) for c in self.cores], (self.out_features, self.in_features))

    def contracts(self, rows: int) -> bool:
        """Whether a call with ``rows`` input rows goes through the core contractions (fewer
        multiply-adds than forming the weight and one GEMM)."""
        per_row, build, dense_row = self._row_macs
        return rows * per_row <= build + rows * dense_row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cores = [c.to(x.dtype) for c in self.cores]
        if self.contracts(x.numel() // self.in_features):
            y = tt_forward(x, cores, self.out_features)
        else:
            y = x @ tt_full(cores, (self.out_features, self.in_features)).T
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def stored_bits(self) -> int:
        return sum(c.numel() * torch.finfo(c.dtype).bits for c in self.cores)

    @classmethod
    def describe(cls, params: dict[str, Any]) -> Layout:
        return Layout(detail=f"TT {params['out_modes']}x{params['in_modes']} ranks {params['ranks'][1:-1]}")

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, modes={self.out_modes}x{self.in_modes}, ranks={self.ranks}"
