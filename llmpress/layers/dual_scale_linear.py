"""``DualScaleLinear``: D²Quant's binary-coded dual-scale weights (compress/quant/dsq.py).

Stored tensors (``<module>.<name>`` in safetensors):
- ``sign_bits`` int32 ``[k, out, ceil(in/32)]``: one bit-plane per bit, bit ``c % 32`` of word
  ``c // 32`` set where ``b_t[o, c] = +1``;
- ``scales`` fp16 ``[k, out, n_groups]``: ``r_t`` per (row, group of ``group_size`` columns);
- ``column_scale`` fp16 ``[in]``, only while the per-column scale ``c`` is not absorbed into the
  preceding linear (it is whenever that linear is ``up_proj`` of a gated MLP);
- ``bias`` when the original linear had one.
``W[o, c] = column_scale[c] · Σ_t scales[t, o, c // group_size] · b_t[o, c]``. The forward scales
the input by ``column_scale`` and runs ``kernels.cpu_ext.binary_coded_matmul`` on the sign planes.
"""

from __future__ import annotations

from typing import Any

import torch

from ..formats.dual_scale import DualScaleWeight, dual_scale_dense
from ..formats.packing import pack_codes, packed_words, unpack_codes
from ..kernels.cpu_ext import binary_coded_matmul
from .base import CompressedLinear, Layout


class DualScaleLinear(CompressedLinear):
    format_name = "dual-scale"
    format_keys = ("in_features", "out_features", "bits", "group_size", "bias", "column_scale")

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int, bias: bool,
                 column_scale: bool, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if not 1 <= bits <= 4 or group_size < 1:
            raise ValueError(f"bits {bits} and group_size {group_size} do not describe a dual-scale weight")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        kw = {"device": device}
        n_groups = -(-in_features // group_size)
        self.register_buffer("sign_bits", torch.zeros(bits, out_features, packed_words(in_features, 1), dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(bits, out_features, n_groups, dtype=torch.float16, **kw))
        self.register_buffer("column_scale", torch.ones(in_features, dtype=torch.float16, **kw) if column_scale else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw) if bias else None)
        self.compute_dtype = dtype

    @classmethod
    def from_dsq(cls, q: DualScaleWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> DualScaleLinear:
        bits, out_features, in_features = q.signs.shape
        layer = cls(in_features, out_features, bits=bits, group_size=q.group_size, bias=bias is not None,
                    column_scale=True, dtype=dtype)
        layer.sign_bits.copy_(pack_codes(q.signs.to(torch.int64), 1))
        layer.scales.copy_(q.scales.to(torch.float16))
        layer.column_scale.copy_(q.column_scale.to(torch.float16))
        if bias is not None:
            layer.bias.copy_(bias.detach().to(dtype))
        return layer

    def take_column_scale(self) -> torch.Tensor:
        """Remove ``c`` from this module (the caller absorbs it upstream) and return it (fp32)."""
        c = self.column_scale.to(torch.float32)
        self.column_scale = None
        return c

    def signs(self) -> torch.Tensor:
        """``[k, out, in]`` bool, True where the bit-plane holds +1."""
        return unpack_codes(self.sign_bits, 1, self.in_features).bool()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dual_scale_dense(self.signs(), self.scales, self.group_size, self.column_scale).to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.column_scale is not None:
            flat = flat * self.column_scale.to(flat.dtype)
        planes = lambda: dual_scale_dense(self.signs(), self.scales, self.group_size, None).to(x.dtype)
        y = binary_coded_matmul(flat, self.sign_bits, self.scales.to(torch.float32), self.group_size, planes)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def stored_bits(self) -> int:
        """Sign bits, the fp16 row scales, and the column scales while they are not absorbed."""
        column = self.column_scale.numel() * 16 if self.column_scale is not None else 0
        return self.bits * self.out_features * self.in_features + self.scales.numel() * 16 + column

    @classmethod
    def describe(cls, params: dict[str, Any]) -> Layout:
        column = "stored" if params["column_scale"] else "absorbed upstream"
        return Layout(bits=str(params["bits"]), group=str(params["group_size"]), detail=f"binary-coded, column scale {column}")

    def validate(self) -> None:
        if not torch.isfinite(self.scales).all():
            raise ValueError("scales contain NaN or Inf")

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}, "
                f"column_scale={'stored' if self.column_scale is not None else 'absorbed'}")
