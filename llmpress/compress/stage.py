"""What every stage of a recipe is, and the registry of methods.

A method is one file (under ``quant/``, ``factor/``, ``rotate/``, or ``correction.py``) holding its
typed stage config and the functions the executor calls, registered once with :func:`register`.
The recipe's stage union, ``--set`` and the error messages derive from the registry; the executor
finds a method's functions here and knows no method by name.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

ALLOWED_BITS = (2, 3, 4, 8)


class StageBase(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    kind: ClassVar[str] = "layer"          # transform | layer | allocator | correction | tuning
    needs: ClassVar[frozenset[str]] = frozenset()   # statistics the compressor reads

    targets: list[str] = Field(default_factory=lambda: [".*"])
    ignore: list[str] = Field(default_factory=list)
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @property
    def solves_on_device(self) -> bool:
        """Whether the solve runs on the block's device (a GPU) as well as on the CPU; the others
        solve on the CPU, from their statistics' copies there."""
        return False

    @field_validator("targets", "ignore")
    @classmethod
    def _valid_regexes(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"bad regular expression {p!r}: {e}") from None
        return patterns

    @model_validator(mode="after")
    def _valid_overrides(self):
        for pattern, fields in self.overrides.items():
            re.compile(pattern)
            bad = set(fields) - set(type(self).model_fields) | {"targets", "ignore", "overrides"} & set(fields)
            if bad:
                raise ValueError(f"override {pattern!r} sets unknown or structural fields {sorted(bad)}")
            type(self).model_validate({**self.model_dump(exclude={"overrides"}), **fields})
        return self

    def selects(self, module_name: str) -> bool:
        return any(re.search(p, module_name) for p in self.targets) and not any(
            re.search(p, module_name) for p in self.ignore
        )

    def for_module(self, module_name: str) -> StageBase:
        """This stage's settings for one module, overrides applied in the order written."""
        update: dict[str, Any] = {}
        for pattern, fields in self.overrides.items():
            if re.search(pattern, module_name):
                update.update(fields)
        if not update:
            return self
        return type(self).model_validate({**self.model_dump(exclude={"overrides"}), **update})


class UniformQuantStage(StageBase):
    bits: int
    group_size: int = -1
    sym: bool = False
    mse: bool = False

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in ALLOWED_BITS:
            raise ValueError(f"bits must be one of {ALLOWED_BITS}, got {v}")
        return v

    @property
    def label(self) -> str:
        return f"{self.method} w{self.bits}" + (f" g{self.group_size}" if self.group_size > 0 else "")

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError(f"group_size must be -1 (per row) or positive, got {v}")
        return v


# GGML's grids a layer stage can solve on (formats/ggml.py), with the bit width each is named for
GGML_GRIDS = {"q4_0": 4, "q4_1": 4, "q5_0": 5, "q5_1": 5, "q8_0": 8,
              "q2_k": 2, "q3_k": 3, "q4_k": 4, "q5_k": 5, "q6_k": 6}


class GridQuantStage(UniformQuantStage):
    """A uniform quantizer that can also solve on one of GGML's block grids (``grid: q4_k``): the
    grid is then fitted first with llama.cpp's own search and the method only chooses the codes;
    ``bits`` and ``group_size`` follow from the grid, whatever else the recipe says (rows llama.cpp
    cannot store in the type fall back as its quantizer does)."""

    # codes on this stage's own grid, which round-to-nearest reproduces without data (DSQ: no,
    # its grid carries a column scale): the data-free fallback and block tuning rely on it
    codes_on_own_grid: ClassVar[bool] = True

    grid: Literal["uniform", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"] = "uniform"
    # llama.cpp's per-tensor type assignment of a named file type, expanded into per-module
    # `overrides` once the model's depth is known (compress/quant/ggml_grid.mixture_overrides)
    mixture: Literal["none", "q4_k_m"] = "none"
    # fit a GGML grid with llama.cpp's importance-matrix search (what `llama-quantize --imatrix`
    # writes), the importance being each input's mean square on the calibration data: the
    # Hessian's diagonal, which is what `llama-imatrix` collects. No effect on the uniform grid.
    imatrix: bool = False

    @model_validator(mode="before")
    @classmethod
    def _grid_bits(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("grid", "uniform") in GGML_GRIDS:
            # the grid fixes both (an override that switches grid replaces them too)
            data = {**data, "bits": GGML_GRIDS[data["grid"]],
                    "group_size": 32 if data["grid"].endswith(("_0", "_1")) else 256}
        return data

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:   # a GGML grid brings its own width: checked below, without one
        return v

    @model_validator(mode="after")
    def _bits_without_grid(self):
        if self.grid == "uniform" and self.bits not in ALLOWED_BITS:
            raise ValueError(f"bits must be one of {ALLOWED_BITS}, got {self.bits}")
        return self

    @property
    def fits_with_importance(self) -> bool:
        return self.imatrix and self.grid != "uniform"

    @property
    def label(self) -> str:
        if self.grid == "uniform":
            return super().label
        return f"{self.method} {self.grid.upper()}" + (" imatrix" if self.fits_with_importance else "")


# Storage of a factorization's values (factors, TT cores). fp16 by default, as the papers' fp16
# models store them: the solve runs in fp32 and its result is rounded once.
FactorValues = Literal["float16", "bfloat16", "float32"]


class AllocatorStage(StageBase):
    """A global budget: a profiling pass scores every selected linear's options, one knapsack
    (compress/factor/knapsack.py) picks one per linear, and the plan becomes per-module
    ``overrides`` (``ignore`` for the linears kept dense); the recipe saved with the model holds it."""

    kind: ClassVar[str] = "allocator"
    needs: ClassVar[frozenset[str]] = frozenset({"hessian"})
    target: float = Field(gt=0, lt=1)    # the fraction of the selected linears' stored bits removed
    removed_grid: list[float] = Field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 15)])
    buckets: int = Field(50_000, ge=100)   # resolution of the knapsack's size axis
    safety_cap: bool = False             # ROCKET's per-layer error cap α·ē before the knapsack

    @field_validator("removed_grid")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < r < 1 for r in v):
            raise ValueError("removed_grid holds fractions strictly between 0 and 1")
        return sorted(set(v))

    keep_dense: ClassVar[bool] = True    # "leave this linear dense" is one of every linear's options

    def removed_target(self, value_bits: int) -> float:
        """The fraction of the dense layers' bits the knapsack must remove."""
        return self.target


class RotationStage(BaseModel):
    """A transform: rotations fused into the weights (QuaRot's computational invariance), so the
    full-precision function is unchanged and the quantizers that follow see incoherent weights.
    It runs before every layer stage, on the whole model."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    kind: ClassVar[str] = "transform"
    needs: ClassVar[frozenset[str]] = frozenset()

    seed: int = 0            # the random sign flips
    heads: bool = True       # also rotate within attention heads (v_proj output, o_proj input)
    online: bool = True      # an online Hadamard before down_proj (off: stock-HF exportable packed weights)


# (stage, weight [out, in] fp32, statistics, bias, dtype) -> (compressed module, metrics), or with a
# third element: a per-input scale the module's weight still needs until a block hook absorbs it
Built = tuple[nn.Module, dict[str, float]] | tuple[nn.Module, dict[str, float], Any]
Compress = Callable[..., Built]
# (stage, weight, hessian, value_bits) -> the linear's options for an allocator's knapsack
Profile = Callable[..., list[Any]]


@dataclass(frozen=True)
class Method:
    stage: type[BaseModel]
    compress: Compress | None = None   # layer compressors and allocators
    profile: Profile | None = None     # allocators
    hooks: type | None = None          # a BlockHooks subclass (compress/hooks.py): block-level work


_METHODS: dict[str, Method] = {}


def register(stage: type[BaseModel], *, compress: Compress | None = None, profile: Profile | None = None,
             hooks: type | None = None) -> None:
    """Register ``stage`` under every name its ``method`` field accepts."""
    annotation = stage.model_fields["method"].annotation
    for name in getattr(annotation, "__args__", ()):
        _METHODS[name] = Method(stage, compress, profile, hooks)


_METHOD_PACKAGES = ("quant", "factor", "rotate")
_LOADED: list[bool] = []


def methods() -> dict[str, Method]:
    """Every registered method by name (importing the method files registers them; some may
    have registered already, imported by their users)."""
    if not _LOADED:
        _LOADED.append(True)
        for package in _METHOD_PACKAGES:
            module = importlib.import_module(f"{__package__}.{package}")
            for info in pkgutil.iter_modules(module.__path__):
                importlib.import_module(f"{module.__name__}.{info.name}")
        importlib.import_module(f"{__package__}.correction")
    return _METHODS


def method_of(stage: BaseModel) -> Method:
    return methods()[stage.method]
