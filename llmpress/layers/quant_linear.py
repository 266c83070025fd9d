"""``QuantLinear``: uniform-grid integer weights, densely bit-packed, with fp16 group scales.

Stored tensors (``<module>.<name>`` in safetensors):
- ``qweight`` int32 ``[out, ceil(in·bits/32)]``: codes along the input dimension (kernels/packing);
- ``scales`` fp16 ``[out, n_groups]``;
- ``qzeros`` int32 ``[out, ceil(n_groups·bits/32)]``: integer zero points, packed like the codes;
- ``g_idx`` int32 ``[in]``, only for act-order with dynamic groups: the group of each column;
- ``bias`` in the model's dtype, when the original linear had one.
Dequantized weight: ``W[o, c] = scales[o, g] * (code[o, c] - zero[o, g])`` with ``g = g_idx[c]``
(or ``c // group_size``).

In memory an act-order layer may be held in group order (``hold_in_group_order``, done at load
where the CPU decoding kernel reads codes as stored): its columns sorted by group, ``g_idx`` gone
and the sort kept as ``input_order``, so that contiguous-group kernels read it with nothing held
beside it. ``state_dict``, ``dequantize`` and ``in_stored_order`` still give the stored layout.
"""

from __future__ import annotations

from typing import Any

import torch

from ..formats.packing import SUPPORTED_BITS, pack_codes, packed_words, unpack_codes
from ..formats.uniform import QuantizedWeight, dequantize_uniform, group_count
from ..kernels import cpu_ext, cpu_int4
from ..kernels.derived import Derived
from ..kernels.dispatch import uniform_linear
from ..kernels.grouping import SharedInputGroup
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
        # column c of the held codes is stored column input_order[c] (hold_in_group_order), or None
        self.register_buffer("input_order", None, persistent=False)
        self.register_state_dict_post_hook(_stored_state)
        self.register_load_state_dict_pre_hook(_loading_state)
        self.compute_dtype = dtype
        self._int4_reason: str | None = None      # caches of the CPU int4 path (kernels/dispatch)
        self._gemv_fast: bool | None = None       # whether the C++ GEMV's fast path takes this layer
        self._int4_pack: Derived[cpu_int4.Int4Pack] = Derived()
        self.shared_input: SharedInputGroup | None = None   # set by layers.shared_input

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
        weight = dequantize_uniform(
            self.qweight, self.scales, self.qzeros, self.g_idx, bits=self.bits,
            in_features=self.in_features, group_size=self.group_size, dtype=dtype or self.compute_dtype,
        )
        if self.input_order is None:
            return weight
        stored = torch.empty_like(weight)
        stored[:, self.input_order] = weight
        return stored

    # -- the group order held in memory ---------------------------------------------------------
    def hold_in_group_order(self) -> bool:
        """Sort an act-order layer's columns by group, in place (see the module's docstring); the
        computed function is unchanged. Layers whose groups are not full before the last keep their
        order. Returns whether the layer changed."""
        if self.g_idx is None or self.input_order is not None or self.n_groups == 1:
            return False
        order = torch.argsort(self.g_idx.to(torch.int64), stable=True)
        contiguous = torch.arange(self.in_features, device=order.device) // self.group_size
        if not torch.equal(self.g_idx.to(torch.int64)[order], contiguous):
            return False
        codes = unpack_codes(self.qweight, self.bits, self.in_features)[:, order]
        self.qweight = pack_codes(codes, self.bits).to(self.qweight.device)
        self.g_idx = None
        self.input_order = order
        self._int4_reason = self._gemv_fast = None
        return True

    def in_stored_order(self) -> QuantLinear:
        """This layer as stored (itself, unless it is held in group order: then a copy)."""
        if self.input_order is None:
            return self
        copy = type(self)(self.in_features, self.out_features, bits=self.bits, group_size=self.group_size,
                          sym=self.sym, bias=self.bias is not None, has_g_idx=True, dtype=self.compute_dtype,
                          device=self.qweight.device)
        copy.load_state_dict(self.state_dict())
        return copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return uniform_linear(self, x)

    def cpu_int4_reason(self) -> str | None:
        """Why the CPU int4 kernel cannot run this layer (None: it can)."""
        if self._int4_reason is None:
            self._int4_reason = cpu_int4.unsupported_reason(self) or ""
        return self._int4_reason or None

    def cpu_gemv_fast(self) -> bool:
        """Whether the C++ GEMV decodes this layer's codes on its fast path (``kernels.cpu_ext``):
        then decoding reads the stored codes and no int4 copy is made."""
        if self._gemv_fast is None:
            contiguous = self.g_idx is None or self.n_groups == 1   # one group: the column order is moot
            self._gemv_fast = contiguous and cpu_ext.uniform_gemv_fast(self.bits, self.in_features, self.group_size)
        return self._gemv_fast

    def cpu_int4_pack(self) -> cpu_int4.Int4Pack:
        """This layer in torch's int4 layout, converted on first use and kept while the packed
        tensors are unchanged."""
        return self._int4_pack.get(lambda: cpu_int4.pack_key(self), lambda: cpu_int4.pack_for_cpu(self))

    def stored_bits(self) -> int:
        """Bits this module stores for its weight: codes, scales, zeros and g_idx (bias excluded)."""
        total = self.qweight.numel() * 32 + self.scales.numel() * 16 + self.qzeros.numel() * 32
        return total + (self.in_features * 32 if self.has_g_idx else 0)

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


def _stored_state(module: QuantLinear, state: dict, prefix: str, local_metadata) -> None:
    """``state_dict`` of a layer held in group order: the stored column order and ``g_idx``."""
    order = module.input_order
    if order is None:
        return
    codes = unpack_codes(module.qweight, module.bits, module.in_features)
    stored = torch.empty_like(codes)
    stored[:, order] = codes
    state[prefix + "qweight"] = pack_codes(stored, module.bits).to(module.qweight.device)
    g_idx = torch.empty(module.in_features, dtype=torch.int32, device=order.device)
    g_idx[order] = (torch.arange(module.in_features, device=order.device) // module.group_size).to(torch.int32)
    state[prefix + "g_idx"] = g_idx


def _loading_state(module: QuantLinear, state: dict, prefix: str, *_) -> None:
    """Loading into a layer held in group order: it takes the stored layout again first."""
    if module.input_order is not None:
        module.g_idx = torch.zeros(module.in_features, dtype=torch.int32, device=module.qweight.device)
        module.input_order = None
        module._int4_reason = module._gemv_fast = None


def hold_act_order_in_group_order(model: torch.nn.Module) -> int:
    """Hold every act-order layer on the CPU in group order where the C++ GEMV's fast path then
    decodes it (``QuantLinear.hold_in_group_order``); returns how many changed."""
    changed = 0
    for m in model.modules():
        if (isinstance(m, QuantLinear) and m.g_idx is not None and m.qweight.device.type == "cpu"
                and cpu_ext.uniform_gemv_fast(m.bits, m.in_features, m.group_size)):
            changed += m.hold_in_group_order()
    return changed
