"""What every compressed linear is: a storage format with its manifest parameters, its tensors,
the dense weight it stands for, and what it costs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class Layout:
    """How ``llmpress inspect`` shows a format's parameters ("–" where one does not apply)."""

    bits: str = "–"
    group: str = "–"
    act_order: str = "–"
    detail: str = "–"


class CompressedLinear(nn.Module, ABC):
    """A linear stored in one of llmpress's formats. Subclasses name their ``format_name`` (the
    manifest's key) and are registered by it on definition."""

    format_name: ClassVar[str]
    formats: ClassVar[dict[str, type[CompressedLinear]]] = {}
    in_features: int
    out_features: int

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "format_name" in cls.__dict__:
            CompressedLinear.formats[cls.format_name] = cls

    format_keys: ClassVar[tuple[str, ...]]   # the constructor's arguments, as the manifest records them
    format_defaults: ClassVar[dict[str, Any]] = {}   # keys that manifests written before them lack

    def format_params(self) -> dict[str, Any]:
        """What the manifest records to rebuild this module before its tensors are loaded (a
        buffer's entry says whether the module has it)."""
        return {key: self._buffers[key] is not None if key in self._buffers else getattr(self, key)
                for key in self.format_keys}

    @classmethod
    def from_format_params(cls, params: dict[str, Any], dtype: torch.dtype) -> CompressedLinear:
        """The module with its tensors on the meta device, from ``format_params()``."""
        args = {key: params[key] if key in params or key not in cls.format_defaults else cls.format_defaults[key]
                for key in cls.format_keys}
        if not all(isinstance(v, int | None) or isinstance(v, list) and all(isinstance(i, int) for i in v)
                   for v in args.values()):
            raise ValueError("parameters must be integers, flags or lists of integers")
        return cls(args.pop("in_features"), args.pop("out_features"), **args, dtype=dtype, device="meta")

    @abstractmethod
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``[out, in]`` weight this module computes with."""

    @abstractmethod
    def stored_bits(self) -> int:
        """Bits stored for the weight (bias excluded)."""

    @classmethod
    @abstractmethod
    def describe(cls, params: dict[str, Any]) -> Layout:
        """The manifest parameters as ``llmpress inspect`` shows them."""

    def validate(self) -> None:
        """Raise ``ValueError`` if the loaded tensors cannot be used (indices out of range, scales
        that are not finite): a tampered file fails at load, not inside a matmul."""


def value_dtype_for(value_bits: int | None, dtype: torch.dtype) -> torch.dtype:
    """The dtype a format's values (factors, TT cores) are built in before their tensors load:
    ``dtype`` when the width is not given or is its own, else fp16 (16 bits) or fp32 (32)."""
    if value_bits is None or value_bits == torch.finfo(dtype).bits:
        return dtype
    if value_bits not in (16, 32):
        raise ValueError(f"values of {value_bits} bits are not stored by this format")
    return torch.float16 if value_bits == 16 else torch.float32


def outermost_compressed(root: nn.Module) -> dict[str, CompressedLinear]:
    """The compressed linears under ``root`` by name, leaving out those that live inside another
    (the module a ``HarpLinear`` wraps): each one's function once."""
    found: dict[str, CompressedLinear] = {}
    for name, module in root.named_modules():
        if isinstance(module, CompressedLinear) and not any(name.startswith(f"{n}.") for n in found):
            found[name] = module
    return found
