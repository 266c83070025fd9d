"""``BCQLinear``: binary-coded weights with power-of-two scales (ShiftAdd; compress/quant/bcq.py).

Stored tensors (``<module>.<name>`` in safetensors):
- ``sign_bits`` int32 ``[q, out, ceil(in/32)]``: one bit-plane per bit, bit ``c % 32`` of word
  ``c // 32`` set where ``b_t[o, c] = +1``;
- ``alpha_exp`` and ``alpha_sign`` int8 ``[q, row_groups, col_blocks, terms]``: each scale is
  ``Σ_p sign_p · 2^exp_p`` for the block of ``out/row_groups`` rows × ``col_block`` columns;
- ``bias`` when the original linear had one.
``W = Σ_t α_t ⊙ b_t``. The forward: ``kernels.cpu_ext.binary_coded_matmul`` (a lookup-table GEMV
for a few tokens, the weight dequantized for that call otherwise; nothing dense is kept).
"""

from __future__ import annotations

from typing import Any

import torch

from ..formats.bcq import BCQWeight, apot_value, bcq_dense
from ..formats.packing import pack_codes, packed_words, unpack_codes
from ..kernels.cpu_ext import binary_coded_matmul
from ..kernels.derived import Derived
from .base import CompressedLinear, Layout


class BCQLinear(CompressedLinear):
    format_name = "bcq"
    format_keys = ("in_features", "out_features", "bits", "col_block", "row_groups", "terms", "bias")

    def __init__(self, in_features: int, out_features: int, *, bits: int, col_block: int, row_groups: int,
                 terms: int, bias: bool, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if not 1 <= bits <= 8 or col_block < 1 or row_groups < 1 or out_features % row_groups or not 1 <= terms <= 8:
            raise ValueError(f"bits {bits}, col_block {col_block}, row_groups {row_groups}, terms {terms} do not "
                             f"describe a binary-coded {out_features}x{in_features} weight")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.col_block, self.row_groups, self.terms = bits, col_block, row_groups, terms
        col_blocks = -(-in_features // col_block)
        kw = {"device": device}
        self.register_buffer("sign_bits", torch.zeros(bits, out_features, packed_words(in_features, 1), dtype=torch.int32, **kw))
        self.register_buffer("alpha_exp", torch.zeros(bits, row_groups, col_blocks, terms, dtype=torch.int8, **kw))
        self.register_buffer("alpha_sign", torch.zeros(bits, row_groups, col_blocks, terms, dtype=torch.int8, **kw))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw) if bias else None)
        self.compute_dtype = dtype
        self._scales: Derived[torch.Tensor] = Derived()

    @classmethod
    def from_bcq(cls, q: BCQWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> BCQLinear:
        bits, out_features, in_features = q.signs.shape
        layer = cls(in_features, out_features, bits=bits, col_block=q.col_block, row_groups=q.alpha_exp.shape[1],
                    terms=q.alpha_exp.shape[3], bias=bias is not None, dtype=dtype)
        layer.sign_bits.copy_(pack_codes(q.signs.to(torch.int64), 1))
        layer.alpha_exp.copy_(q.alpha_exp)
        layer.alpha_sign.copy_(q.alpha_sign)
        if bias is not None:
            layer.bias.copy_(bias.detach().to(dtype))
        return layer

    def signs(self) -> torch.Tensor:
        """``[q, out, in]`` bool, True where the bit-plane holds +1."""
        return unpack_codes(self.sign_bits, 1, self.in_features).bool()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return bcq_dense(self.signs(), self.alpha_exp, self.alpha_sign, self.col_block).to(dtype or self.compute_dtype)

    def _float_scales(self) -> torch.Tensor:
        """The scales as float32 ``[q, row_groups, col_blocks]``, computed once and kept while the
        stored exponents are unchanged (a few KB: the weight itself stays packed)."""
        return self._scales.get(lambda: (self.alpha_exp.data_ptr(), self.alpha_exp._version, self.alpha_sign._version),
                                lambda: apot_value(self.alpha_exp, self.alpha_sign).to(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = binary_coded_matmul(flat, self.sign_bits, self._float_scales(), self.col_block,
                                lambda: self.dequantize(x.dtype))
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def stored_bits(self) -> int:
        """Sign bits plus the scales' exponents and signs (8 bits each)."""
        return self.bits * self.out_features * self.in_features + (self.alpha_exp.numel() + self.alpha_sign.numel()) * 8

    @classmethod
    def describe(cls, params: dict[str, Any]) -> Layout:
        block = f"{params['out_features'] // params['row_groups']}x{params['col_block']}"
        return Layout(bits=str(params["bits"]), group=block, detail=f"binary-coded, {params['terms']} powers of two per scale")

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"scales per {self.out_features // self.row_groups} rows x {self.col_block} cols, apot={self.terms}")
