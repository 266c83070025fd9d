"""``GGMLLinear``: a weight stored in one of GGML's block formats, byte for byte as a GGUF file holds it.

Stored tensors (``<module>.<name>`` in safetensors):
- ``blocks`` uint8 ``[out, (in / block) · type_size]``: each row's blocks (formats/ggml.py);
- ``bias`` in the model's dtype, when the original linear had one.
The manifest records the GGML type id. The GGUF export copies ``blocks`` unchanged, so the file
llama.cpp runs holds exactly the weights llmpress measured. The forward dequantizes per call (the
reference path; no dense copy is kept); decoding inputs on CPU run the C++ affine GEMV
(``kernels.dispatch.ggml_linear``) on the codes decoded to bytes once, with fp32 steps and offsets
per sub-block (about 8 + 64/sub bits per weight held beside the stored blocks).
"""

from __future__ import annotations

from typing import Any

import torch

from ..formats.ggml import TYPE_BY_ID, GGMLWeight, dequantize_bytes, pack, row_bytes, unpack
from ..kernels.derived import Derived
from ..kernels.dispatch import ggml_linear
from .base import CompressedLinear, Layout


class GGMLLinear(CompressedLinear):
    format_name = "ggml"
    format_keys = ("in_features", "out_features", "ggml_type", "bias")

    def __init__(self, in_features: int, out_features: int, *, ggml_type: int, bias: bool,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if ggml_type not in TYPE_BY_ID:
            raise ValueError(f"unknown GGML type id {ggml_type}")
        t = TYPE_BY_ID[ggml_type]
        if in_features % t.block:
            raise ValueError(f"{in_features} inputs are not a whole number of {t.name} blocks of {t.block}")
        self.in_features, self.out_features, self.ggml_type = in_features, out_features, ggml_type
        kw = {"device": device}
        self.register_buffer("blocks", torch.zeros(out_features, row_bytes(t, in_features), dtype=torch.uint8, **kw))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw) if bias else None)
        self.compute_dtype = dtype
        self._decoded: Derived[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = Derived()   # decoding GEMV

    @property
    def type(self):
        return TYPE_BY_ID[self.ggml_type]

    @classmethod
    def from_weight(cls, w: GGMLWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> GGMLLinear:
        out_features, in_features = w.codes.shape
        layer = cls(in_features, out_features, ggml_type=w.type.type_id, bias=bias is not None, dtype=dtype)
        layer.blocks.copy_(pack(w))
        if bias is not None:
            layer.bias.copy_(bias.detach().to(dtype))
        return layer

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_bytes(self.type, self.blocks, self.in_features).to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ggml_linear(self, x)

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Byte codes ``[out, in]`` and fp32 ``step``, ``offset`` ``[out, sub-blocks]`` with
        ``W = step·q − offset``, decoded once and kept while ``blocks`` is unchanged."""
        return self._decoded.get(lambda: (self.blocks.data_ptr(), self.blocks._version), self._decode)

    def _decode(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        w = unpack(self.type, self.blocks, self.in_features)
        a, b = w.step_and_offset()
        offset = b if b is not None else a * self.type.zero   # the zero is a power of two: exact
        return w.codes.contiguous(), a.contiguous(), offset.contiguous(), self.type.sub

    def stored_bits(self) -> int:
        return self.blocks.numel() * 8

    @classmethod
    def describe(cls, params: dict[str, Any]) -> Layout:
        t = TYPE_BY_ID[int(params["ggml_type"])]
        return Layout(bits=f"{t.bits_per_weight:.4g}", group=str(t.sub), detail=f"GGUF {t.name.upper()}")

    def validate(self) -> None:
        w = self.dequantize(torch.float32)
        if not torch.isfinite(w).all():
            raise ValueError("blocks hold NaN or Inf scales")

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, type={self.type.name.upper()}"
