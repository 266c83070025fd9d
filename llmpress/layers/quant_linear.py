"""``QuantLinear``: uniform-grid integer weights, densely bit-packed, with fp16 group scales.

Stored tensors (``<module>.<name>`` in safetensors):
- ``qweight`` int32 ``[out, ceil(in·bits/32)]``: codes along the input dimension (kernels/packing);
- ``scales`` fp16 ``[out, n_groups]``;
- ``qzeros`` int32 ``[out, ceil(n_groups·bits/32)]``: integer zero points, packed like the codes;
- ``g_idx`` int32 ``[in]``, only for act-order with dynamic groups: the group of each column;
- ``bias`` in the model's dtype, when the original linear had one.
Dequantized weight: ``W[o, c] = scales[o, g] * (code[o, c] - zero[o, g])`` with ``g = g_idx[c]``
(or ``c // group_size``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..formats.packing import SUPPORTED_BITS, pack_codes, packed_words
from ..formats.uniform import QuantizedWeight, dequantize_uniform, group_count
from ..kernels import cpu_int4
from ..kernels.derived import Derived
from ..kernels.dispatch import uniform_linear
from .base import CompressedLinear, Layout


class QuantLinear(CompressedLinear):
    format_name = "uniform"
    format_keys = ("in_features", "out_features", "bits", "group_size", "sym", "bias", "has_g_idx")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int,
        sym: bool,
        bias: bool,
        has_g_idx: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.n_groups = group_count(in_features, group_size)
        kw = {"device": device}
        self.register_buffer("qweight", torch.zeros(out_features, packed_words(in_features, bits), dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(out_features, self.n_groups, dtype=torch.float16, **kw))
        self.register_buffer("qzeros", torch.zeros(out_features, packed_words(self.n_groups, bits), dtype=torch.int32, **kw))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, **kw) if has_g_idx else None)
        self.has_g_idx = has_g_idx
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw) if bias else None)
        self.compute_dtype = dtype
        self._int4_reason: str | None = None      # caches of the CPU int4 path (kernels/dispatch)
        self._int4_pack: Derived[cpu_int4.Int4Pack] = Derived()
        self.shared_input: cpu_int4.SharedInputGemm | None = None   # set by layers.shared_input

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, q: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> QuantLinear:
        out_features, in_features = q.codes.shape
        layer = cls(
            in_features, out_features, bits=q.bits, group_size=q.group_size, sym=q.sym,
            bias=bias is not None, has_g_idx=q.g_idx is not None, dtype=dtype,
        )
        layer.qweight.copy_(pack_codes(q.codes, q.bits))
        layer.scales.copy_(q.scales.to(torch.float16))
        layer.qzeros.copy_(pack_codes(q.zeros.to(torch.int64), q.bits))
        if q.g_idx is not None:
            layer.g_idx.copy_(q.g_idx)
        if bias is not None:
            layer.bias.copy_(bias.detach().to(dtype))
        return layer

    # -- use ----------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_uniform(
            self.qweight, self.scales, self.qzeros, self.g_idx, bits=self.bits,
            in_features=self.in_features, group_size=self.group_size, dtype=dtype or self.compute_dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return uniform_linear(self, x)

    def cpu_int4_reason(self) -> str | None:
        """Why the CPU int4 kernel cannot run this layer (None: it can)."""
        if self._int4_reason is None:
            self._int4_reason = cpu_int4.unsupported_reason(self) or ""
        return self._int4_reason or None

    def cpu_int4_pack(self) -> cpu_int4.Int4Pack:
        """This layer in torch's int4 layout, converted on first use and kept while the packed
        tensors are unchanged."""
        return self._int4_pack.get(lambda: cpu_int4.pack_key(self), lambda: cpu_int4.pack_for_cpu(self))

    def stored_bits(self) -> int:
        """Bits this module stores for its weight: codes, scales, zeros and g_idx (bias excluded)."""
        total = self.qweight.numel() * 32 + self.scales.numel() * 16 + self.qzeros.numel() * 32
        return total + (self.g_idx.numel() * 32 if self.g_idx is not None else 0)

    @classmethod
    def describe(cls, params: dict[str, Any]) -> Layout:
        group = "row" if int(params["group_size"]) <= 0 else str(params["group_size"])
        return Layout(bits=str(params["bits"]), group=group, act_order="yes" if params["has_g_idx"] else "no")

    def validate(self) -> None:
        if self.g_idx is not None and self.g_idx.numel() and (self.g_idx.min() < 0 or self.g_idx.max() >= self.n_groups):
            raise ValueError(f"g_idx points outside the {self.n_groups} groups")
        if not torch.isfinite(self.scales).all():
            raise ValueError("scales contain NaN or Inf")

    def extra_repr(self) -> str:
        g = "row" if self.n_groups == 1 else self.group_size
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={g}, sym={self.sym}"
