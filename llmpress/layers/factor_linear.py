"""``FactorLinear``: a linear stored as a dense dictionary and (column-sparse) coefficients.

``y = (x A) C (+ b)`` with ``A [in, k]`` and ``C [k, out]`` (compress/factor/lowrank.py). Stored
tensors (``<module>.<name>`` in safetensors):
- ``dictionary`` ``[k, in]`` (``Aᵀ``, a linear weight) in the model's dtype;
- dense C: ``coef`` ``[out, k]`` (``Cᵀ``);
- sparse C (``nnz`` atoms per output, ELL layout): ``coef_values`` ``[out, nnz]`` and
  ``coef_index`` ``[out, nnz]`` int16 (int32 past 32767 atoms), sorted within each row;
- ``bias`` when the original linear had one.
The forward never rebuilds the dense weight: ``h = x Aᵀ`` then a dense matmul or, for sparse C,
a CSR sparse-dense product built once from the ELL arrays.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..formats.factor import Factors, index_bits
from ..kernels.dispatch import DECODE_MAX_ROWS
from .base import CompressedLinear, Layout


class FactorLinear(CompressedLinear):
    format_name = "factor"
    format_keys = ("in_features", "out_features", "rank", "nnz", "bias")

    def __init__(self, in_features: int, out_features: int, *, rank: int, nnz: int | None, bias: bool,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if rank < 1 or (nnz is not None and not 1 <= nnz <= rank):
            raise ValueError(f"rank {rank} and nnz {nnz} do not describe a factorization")
        self.in_features, self.out_features, self.rank, self.nnz = in_features, out_features, rank, nnz
        kw = {"device": device, "dtype": dtype}
        self.register_buffer("dictionary", torch.zeros(rank, in_features, **kw))
        if nnz is None:
            self.register_buffer("coef", torch.zeros(out_features, rank, **kw))
        else:
            index_dtype = torch.int16 if index_bits(rank) == 16 else torch.int32
            self.register_buffer("coef_values", torch.zeros(out_features, nnz, **kw))
            self.register_buffer("coef_index", torch.zeros(out_features, nnz, dtype=index_dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, **kw) if bias else None)
        self.compute_dtype = dtype
        self._csr = None

    @classmethod
    def from_factors(cls, factors: Factors, bias: torch.Tensor | None, dtype: torch.dtype) -> FactorLinear:
        in_features, rank = factors.dictionary.shape
        out_features = factors.coef.shape[1]
        layer = cls(in_features, out_features, rank=rank, nnz=factors.nnz, bias=bias is not None, dtype=dtype)
        layer.dictionary.copy_(factors.dictionary.T.to(dtype))
        coef_t = factors.coef.T                          # [out, k]
        if factors.mask is None:
            layer.coef.copy_(coef_t.to(dtype))
        else:
            # The kept atoms of each output row, in increasing order (a stable sort of the mask).
            order = torch.sort(factors.mask.T.to(torch.int8), dim=1, descending=True, stable=True).indices
            index = order[:, : factors.nnz].sort(dim=1).values
            layer.coef_index.copy_(index.to(layer.coef_index.dtype))
            layer.coef_values.copy_(coef_t.gather(1, index).to(dtype))
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

    def _sparse_coef(self) -> torch.Tensor:
        key = (self.coef_values.data_ptr(), self.coef_values._version, self.coef_index._version)
        if self._csr is None or self._csr[0] != key:
            rows = torch.arange(0, self.out_features * self.nnz + 1, self.nnz, device=self.coef_values.device)
            with warnings.catch_warnings():   # "CSR support is in beta": it is, and it is what we want
                warnings.simplefilter("ignore", UserWarning)
                csr = torch.sparse_csr_tensor(rows, self.coef_index.reshape(-1).long(), self.coef_values.reshape(-1),
                                              size=(self.out_features, self.rank), check_invariants=False)
            self._csr = (key, csr)
        return self._csr[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stored = self.dictionary.dtype
        if stored != x.dtype and x.numel() <= DECODE_MAX_ROWS * self.in_features and not x.is_cuda and self.nnz is None:
            # decoding: both products in the stored dtype (fp32 accumulation), no per-call upcast
            y = (x.to(stored) @ self.dictionary.T @ self.coef.T).to(x.dtype)
            return y + self.bias.to(x.dtype) if self.bias is not None else y
        h = x @ self.dictionary.to(x.dtype).T
        if self.nnz is None:
            y = h @ self.coef.to(x.dtype).T
        else:
            flat = h.reshape(-1, self.rank)
            y = (self._sparse_coef().to(x.dtype) @ flat.T).T.reshape(*h.shape[:-1], self.out_features)
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
        return Layout(detail=f"rank {params['rank']}, {coef}")

    def validate(self) -> None:
        if self.nnz is None:   # dense coefficients: no indices
            return
        index = self.coef_index
        if index.numel() and (index.min() < 0 or index.max() >= self.rank):
            raise ValueError(f"coef_index points outside the {self.rank} atoms")

    def extra_repr(self) -> str:
        c = "dense" if self.nnz is None else f"{self.nnz} per output"
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, coefficients={c}"
