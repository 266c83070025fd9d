"""``FactorLinear``: a linear stored as a dense dictionary and (column-sparse) coefficients.

``y = (x A) C (+ b)`` with ``A [in, k]`` and ``C [k, out]`` (compress/factor/lowrank.py). Stored
tensors (``<module>.<name>`` in safetensors):
- ``dictionary`` ``[k, in]`` (``Aᵀ``, a linear weight), values in the dtype the stage's ``values``
  names (fp16 by default; the manifest records the width as ``value_bits``);
- dense C: ``coef`` ``[out, k]`` (``Cᵀ``);
- sparse C (``nnz`` atoms per output, ELL layout): ``coef_values`` ``[out, nnz]`` and
  ``coef_index`` ``[out, nnz]`` int16 (int32 past 32767 atoms), sorted within each row;
- ``bias`` when the original linear had one.
The forward never rebuilds the dense weight: ``h = x Aᵀ``, then a dense product with C or, for
sparse C, decoding rows through the C++ ELL GEMV on the stored arrays and larger inputs through C
made dense for that call. Values stored in fp16/bf16 are widened in registers for one decoding row
(``kernels.dispatch.half_weight_gemv``): half the bytes of fp32 read per token.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..formats.factor import Factors, index_bits
from ..kernels import cpu_ext
from ..kernels.dispatch import DECODE_MAX_ROWS, get_backend, half_weight_gemv
from .base import CompressedLinear, Layout, value_dtype_for


class FactorLinear(CompressedLinear):
    format_name = "factor"
    format_keys = ("in_features", "out_features", "rank", "nnz", "bias", "value_bits")
    format_defaults: ClassVar[dict[str, Any]] = {"value_bits": 32}   # folders from before fp16 values stored fp32

    def __init__(self, in_features: int, out_features: int, *, rank: int, nnz: int | None, bias: bool,
                 value_bits: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if rank < 1 or (nnz is not None and not 1 <= nnz <= rank):
            raise ValueError(f"rank {rank} and nnz {nnz} do not describe a factorization")
        self.in_features, self.out_features, self.rank, self.nnz = in_features, out_features, rank, nnz
        # values: 16-bit storage is built as fp16 (a bf16 file's tensors replace it on load)
        kw = {"device": device, "dtype": value_dtype_for(value_bits, dtype)}
        self.register_buffer("dictionary", torch.zeros(rank, in_features, **kw))
        if nnz is None:
            self.register_buffer("coef", torch.zeros(out_features, rank, **kw))
        else:
            index_dtype = torch.int16 if index_bits(rank) == 16 else torch.int32
            self.register_buffer("coef_values", torch.zeros(out_features, nnz, **kw))
            self.register_buffer("coef_index", torch.zeros(out_features, nnz, dtype=index_dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device, dtype=dtype) if bias else None)
        self.compute_dtype = dtype

    @property
    def value_bits(self) -> int:
        """The width the dictionary and coefficients are stored at."""
        return torch.finfo(self.dictionary.dtype).bits

    @classmethod
    def from_factors(cls, factors: Factors, bias: torch.Tensor | None, dtype: torch.dtype,
                     value_dtype: torch.dtype | None = None) -> FactorLinear:
        """The layer that computes in ``dtype`` with its factors' values stored in ``value_dtype``
        (``dtype`` when None); the bias stays in ``dtype``."""
        in_features, rank = factors.dictionary.shape
        out_features = factors.coef.shape[1]
        layer = cls(in_features, out_features, rank=rank, nnz=factors.nnz, bias=bias is not None, dtype=dtype)
        value_dtype = value_dtype or dtype
        layer.dictionary = factors.dictionary.T.to(value_dtype).contiguous()
        coef_t = factors.coef.T                          # [out, k]
        if factors.mask is None:
            layer.coef = coef_t.to(value_dtype).contiguous()
        else:
            # The kept atoms of each output row, in increasing order (a stable sort of the mask).
            order = torch.sort(factors.mask.T.to(torch.int8), dim=1, descending=True, stable=True).indices
            index = order[:, : factors.nnz].sort(dim=1).values
            layer.coef_index.copy_(index.to(layer.coef_index.dtype))
            layer.coef_values = coef_t.gather(1, index).to(value_dtype).contiguous()
        if bias is not None:
            layer.bias.copy_(bias.detach().to(dtype))
        return layer

    # -- use ----------------------------------------------------------------------------------
    def coefficients(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``Cᵀ`` ``[out, k]`` as a dense matrix."""
        dtype = dtype or self.compute_dtype
        if self.nnz is None:
            return self.coef.to(dtype)
        dense = torch.zeros(self.out_features, self.rank, dtype=dtype, device=self.coef_values.device)
        return dense.scatter_(1, self.coef_index.long(), self.coef_values.to(dtype))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``[out, in]`` weight this layer computes with (for calibration and export)."""
        dtype = dtype or self.compute_dtype
        return self.coefficients(dtype) @ self.dictionary.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the reference backend (the oracle) upcasts the stored values: fp32 products throughout
        decoding = not x.is_cuda and x.numel() <= DECODE_MAX_ROWS * self.in_features and get_backend() != "reference"
        h = _times(x, self.dictionary, decoding)
        if self.nnz is None:
            y = _times(h, self.coef, decoding)
        elif decoding and (ext := cpu_ext.extension()) is not None:
            # the stored ELL arrays as they are (indices checked at load by ``validate``)
            flat = h.reshape(-1, self.rank).to(torch.float32)
            y = ext.ell_gemv(flat, self.coef_values, self.coef_index).to(h.dtype).view(*h.shape[:-1], self.out_features)
        else:   # many rows: C made dense for this call only (out x rank, small beside the product)
            y = h @ self.coefficients(h.dtype).T
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def stored_bits(self) -> int:
        """Bits stored for the weight: dictionary, coefficients and their indices (bias excluded)."""
        value_bits = torch.finfo(self.dictionary.dtype).bits
        total = self.dictionary.numel() * value_bits
        if self.nnz is None:
            return total + self.coef.numel() * value_bits
        return total + self.coef_values.numel() * value_bits + self.coef_index.numel() * self.coef_index.element_size() * 8

    @classmethod
    def describe(cls, params: dict[str, Any]) -> Layout:
        coef = "dense C" if params["nnz"] is None else f"{params['nnz']} atoms/output"
        return Layout(detail=f"rank {params['rank']}, {coef}, {params.get('value_bits', 32)}-bit values")

    def validate(self) -> None:
        if self.nnz is None:   # dense coefficients: no indices
            return
        index = self.coef_index
        if index.numel() and (index.min() < 0 or index.max() >= self.rank):
            raise ValueError(f"coef_index points outside the {self.rank} atoms")

    def extra_repr(self) -> str:
        c = "dense" if self.nnz is None else f"{self.nnz} per output"
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, coefficients={c}"


def _times(x: torch.Tensor, weight: torch.Tensor, decoding: bool) -> torch.Tensor:
    """``x · weightᵀ``: one fp32 row against half-precision values through the C++ GEMV; a few rows
    (decoding) in the stored dtype with fp32 accumulation, no per-call upcast; otherwise upcast."""
    y = half_weight_gemv(x, weight)
    if y is not None:
        return y
    if decoding and weight.dtype != x.dtype:
        return (x.to(weight.dtype) @ weight.T).to(x.dtype)
    return x @ weight.to(x.dtype).T

