"""Typed recipes: a list of stages that round-trips through YAML and fails with a clear line.

Every stage has a ``method`` that selects its config class. Layer-compressor stages pick the
decoder linears they compress with ``targets``/``ignore`` (regular expressions searched in the
full module name) and may change their settings per module with ``overrides`` (regex -> fields),
in the spirit of llama.cpp's ``--tensor-type``.
"""

from __future__ import annotations

import difflib
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import RecipeError

ALLOWED_BITS = (2, 3, 4, 8)


class StageBase(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    kind: ClassVar[str] = "layer"          # transform | layer | allocator | correction
    needs: ClassVar[frozenset[str]] = frozenset()   # statistics the compressor reads

    targets: list[str] = Field(default_factory=lambda: [".*"])
    ignore: list[str] = Field(default_factory=list)
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)

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


class RTNStage(UniformQuantStage):
    """Round-to-nearest, per row or per group; data-free."""

    method: Literal["rtn"] = "rtn"


class GPTQStage(UniformQuantStage):
    """GPTQ with act-order, static groups, damping and true-sequential groups; with ``residual``
    also GPTAQ (asymmetric calibration) and GPTAQ+ResComp (compensation-aware error)."""

    method: Literal["gptq"] = "gptq"
    act_order: bool = True
    static_groups: bool = False
    true_sequential: bool = True
    damp: float = Field(0.01, gt=0, le=1)
    block_size: int = Field(128, ge=1)
    # none: GPTQ. gptaq: target the full-precision model's output (needs its input stream).
    # rescomp: gptaq plus ResComp's term for the compensated-versus-original weights.
    residual: Literal["none", "gptaq", "rescomp"] = "none"
    alpha: float = Field(0.25, ge=0)      # GPTAQ's coefficient (its code: 0.25; its paper: none, i.e. 1)
    alpha2: float = Field(0.25, ge=0)     # ResComp's coefficient (its code: 0.25)
    rescomp_form: Literal["paper", "delta"] = "paper"
    # allw: ResComp's consistent mode. auto: its code's rule (org at 2 bits, else allw), whose 'org'
    # lazy update over-compensates and made ResComp worse than GPTAQ at W2 (docs/algorithms.md).
    rescomp_mode: Literal["auto", "org", "allw"] = "allw"

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"hessian", "fp_inputs"}) if self.residual != "none" else frozenset({"hessian"})


class DSQStage(GPTQStage):
    """D²Quant's dual-scale quantizer (for ``down_proj``) inside the GPTQ/GPTAQ column loop:
    ``binary``: the paper's binary-coded levels ``c_j·Σ±r_t`` (``DualScaleLinear``); ``uniform``: the
    standard grid on ``W·diag(1/c)`` (``QuantLinear``). ``c`` is absorbed into ``up_proj``'s scales
    when the architecture has a gated MLP; ``act_order`` means the reference's group-aware order in
    the binary form (compress/quant/dsq.py)."""

    method: Literal["dsq"] = "dsq"
    form: Literal["binary", "uniform"] = "binary"
    group_size: int = 128                # the reference's
    rounds: int = Field(15, ge=0)        # alternating least-squares rounds per group

    @model_validator(mode="after")
    def _binary_bits(self):
        if self.form == "binary" and self.bits > 4:
            raise ValueError("the binary-coded form has 1 to 4 bit-planes")
        return self

    @property
    def label(self) -> str:
        return f"dsq-{self.form} w{self.bits}" + (f" g{self.group_size}" if self.group_size > 0 else "")


class DACStage(BaseModel):
    """A block correction (D²Quant's deviation-aware correction): once a block's attention is
    compressed, the mean shift ``μ`` of the MLP's input norm (full-precision block minus the block
    with compressed attention, on the compressed model's stream) is added after that norm, so the
    MLP is calibrated with it in place; it is then folded exactly into the MLP's input linears'
    biases (``b += Ŵ μ``). With ``final_norm`` the same for the model's final norm (teacher: the
    last block with its MLP still full precision), folded into a bias of the head."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    kind: ClassVar[str] = "correction"
    needs: ClassVar[frozenset[str]] = frozenset({"activations"})   # it runs the block on calibration data

    method: Literal["dac"] = "dac"
    clip: float = Field(10.0, gt=0)      # |μ| per channel is clipped to this (the reference's ±10)
    scale: float = Field(1.0, ge=0)      # λ: μ is multiplied by it (the reference's 1)
    skip_first: int = Field(1, ge=0)     # leading positions of each window left out of the means
                                         # (the attention-sink position has outlier norms)
    final_norm: bool = True              # also correct the final norm (folded into a head bias)

    @property
    def label(self) -> str:
        return "dac"


class LowRankStage(StageBase):
    """A uniform low-rank factorization of every selected linear: ``svd`` truncates the weight's
    SVD (data-free), ``svdllm`` the SVD of the activation-whitened weight (SVD-LLM)."""

    method: Literal["svd", "svdllm"]
    ratio: float = Field(gt=0, lt=1)     # the fraction of each linear's parameters removed

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"hessian"}) if self.method == "svdllm" else frozenset()

    @property
    def label(self) -> str:
        return f"{self.method} -{self.ratio:.0%}"


class ShiftAddStage(StageBase):
    """ShiftAddLLM: binary-coded weights with power-of-two scales, solved inside GPTQ's column loop
    (``gptq: false``: the weight objective only, the BCQ baseline); compress/quant/bcq.py."""

    method: Literal["shiftadd"] = "shiftadd"
    bits: int = Field(ge=1, le=4)
    col_block: int = Field(8, ge=1)      # columns sharing a scale (the paper's Lat. layout: 8)
    row_groups: int = Field(8, ge=1)     # row groups sharing a scale (out/8 rows each)
    terms: int = Field(3, ge=1, le=4)    # powers of two per scale (the code's apot_nums)
    rounds: int = Field(15, ge=0)        # alternating least-squares rounds per scale fit
    gptq: bool = True
    damp: float = Field(0.01, gt=0, le=1)
    block_size: int = Field(128, ge=1)
    true_sequential: bool = True

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"hessian"}) if self.gptq else frozenset()

    @property
    def label(self) -> str:
        return f"shiftadd w{self.bits}" + ("" if self.gptq else " (bcq only)")


class ShiftAddMixStage(ShiftAddStage):
    """ShiftAdd with its bit width chosen per linear under an average-bits budget: every linear's
    GPTQ-BCQ solution is measured at each of ``bit_choices`` (its output error on the calibration
    inputs) and the shared knapsack picks one per linear so that the code bits average at most
    ``average_bits`` (the paper: 2.2)."""

    kind: ClassVar[str] = "allocator"
    method: Literal["shiftadd-mix"] = "shiftadd-mix"
    bits: int = Field(2, ge=1, le=4)     # set per module by the allocation
    average_bits: float = Field(2.2, gt=0)
    bit_choices: list[int] = Field(default_factory=lambda: [2, 3], min_length=1)
    buckets: int = Field(50_000, ge=100)
    safety_cap: bool = False

    @field_validator("bit_choices")
    @classmethod
    def _choices(cls, v: list[int]) -> list[int]:
        if any(not 1 <= b <= 4 for b in v):
            raise ValueError("bit_choices are widths from 1 to 4")
        return sorted(set(v))

    @model_validator(mode="after")
    def _reachable(self):
        if self.average_bits < min(self.bit_choices):
            raise ValueError(f"average_bits {self.average_bits} is below the smallest choice {min(self.bit_choices)}")
        return self

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"hessian"})

    keep_dense: ClassVar[bool] = False   # every selected linear takes one of the bit widths

    def removed_target(self, value_bits: int) -> float:
        return 1.0 - self.average_bits / value_bits


class TTStage(StageBase):
    """Tensor-train (TT-matrix) factorization of every selected linear at a uniform removed
    fraction: data-free TT-SVD, or ``aware`` (ours): TT-SVD in a Kronecker-factored whitened space,
    kept for a linear only where it lowers that linear's exact output error (else the plain TT-SVD),
    then ``refit`` sweeps of exact least squares on the edge cores."""

    method: Literal["tt"] = "tt"
    ratio: float = Field(gt=0, lt=1)     # the fraction of each linear's parameters removed
    order: int = Field(3, ge=2, le=4)    # the number of cores d
    aware: bool = False
    # aware only: sweeps of exact least squares on the first and last core against the full Gram
    # after the guarded TT-SVD (ours; 13-27 s per sweep of a 576x1536 linear on one thread here)
    refit: int = Field(1, ge=0)

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"hessian"}) if self.aware else frozenset()

    @property
    def label(self) -> str:
        return f"tt{'-aware' if self.aware else ''} d={self.order} -{self.ratio:.0%}"


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


class RocketStage(AllocatorStage):
    """ROCKET: whitened sparse-dictionary factorization, with the removed fraction of each linear
    chosen by the knapsack over the candidates' measured errors (compress/factor/rocket.py)."""

    method: Literal["rocket"] = "rocket"
    kappas: list[float] = Field(default_factory=lambda: [1.0, 2.0, 3.0])   # k/s; 1: dense coefficients
    lam: float = Field(0.5, ge=0)        # score = |C0| · a^lam
    safety_cap: bool = True              # the paper's
    rank: int | None = Field(None, ge=1)   # set per module by the allocation
    nnz: int | None = Field(None, ge=1)

    @field_validator("kappas")
    @classmethod
    def _kappas(cls, v: list[float]) -> list[float]:
        if not v or any(k < 1 for k in v):
            raise ValueError("kappas are ratios k/s of at least 1")
        return sorted(set(v))

    @property
    def label(self) -> str:
        if self.rank is None:
            return "rocket"
        return f"rocket k={self.rank}" + (f" s={self.nnz}" if self.nnz else "")


class FactorMixStage(AllocatorStage):
    """One budget over several factorization families: each linear is kept dense, or takes
    whitened low rank (SVD-LLM) or activation-aware TT at one of the removed fractions, whichever
    the knapsack finds cheapest in relative output error."""

    method: Literal["factor-mix"] = "factor-mix"
    families: list[Literal["lowrank", "tt"]] = Field(default_factory=lambda: ["lowrank", "tt"], min_length=1)
    order: int = Field(3, ge=2, le=4)    # TT cores
    family: Literal["lowrank", "tt"] | None = None   # set per module by the allocation
    ratio: float | None = Field(None, gt=0, lt=1)

    @property
    def label(self) -> str:
        return "factor-mix" if self.family is None else f"{self.family} -{self.ratio:.0%}"


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


class RHTStage(RotationStage):
    """Fixed randomized Hadamard rotations of every width (compress/rotate/hadamard.py)."""

    method: Literal["rht"] = "rht"


class HARPStage(RotationStage):
    """A learned residual-stream rotation, initialised at the RHT of the same seed and fitted on
    the proxy quantization error of the grid that follows (compress/rotate/harp.py)."""

    needs: ClassVar[frozenset[str]] = frozenset({"hessian"})
    method: Literal["harp"] = "harp"
    steps: int = Field(100, ge=0)        # Adam steps (the paper: 1200 on a GPU)
    lr: float = Field(0.03, gt=0)        # the paper's lr for both processors
    refresh: int = Field(10, ge=1)       # steps between refreshes of the quantized target (paper: 1)
    groups_per_step: int | None = Field(8, ge=1)   # input groups whose quadratic term a step samples
    fit_samples: int = Field(32, ge=1)   # calibration windows whose Hessians weigh the proxy
    # An earlier run's output folder (or its llmpress-harp.safetensors): use the rotation fitted
    # there instead of fitting again, e.g. to try several quantizers behind one fit.
    reuse: str | None = None
    # The grid of the proxy; by default that of the first quantizer stage.
    bits: int | None = None
    group_size: int | None = None
    sym: bool | None = None

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int | None) -> int | None:
        if v is not None and v not in ALLOWED_BITS:
            raise ValueError(f"bits must be one of {ALLOWED_BITS}, got {v}")
        return v


Stage = Annotated[
    RTNStage | GPTQStage | DSQStage | ShiftAddStage | ShiftAddMixStage | LowRankStage | TTStage | RocketStage | FactorMixStage
    | RHTStage | HARPStage | DACStage,
    Field(discriminator="method"),
]
STAGE_TYPES: dict[str, type[BaseModel]] = {
    "rtn": RTNStage, "gptq": GPTQStage, "shiftadd": ShiftAddStage, "shiftadd-mix": ShiftAddMixStage,
    "svd": LowRankStage, "svdllm": LowRankStage, "tt": TTStage,
    "rocket": RocketStage, "factor-mix": FactorMixStage,
    "rht": RHTStage, "harp": HARPStage, "dsq": DSQStage, "dac": DACStage,
}


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    description: str = ""
    stages: list[Stage] = Field(min_length=1)

    @model_validator(mode="after")
    def _transforms_first(self):
        kinds = [s.kind for s in self.stages]
        if kinds.count("transform") > 1:
            raise ValueError("a recipe holds at most one rotation stage")
        if "transform" in kinds and kinds.index("transform") != 0:
            raise ValueError("the rotation stage must come first: it changes the weights every later stage sees")
        if kinds.count("allocator") > 1:
            raise ValueError("a recipe holds at most one allocator stage (one global budget)")
        if kinds.count("correction") > 1:
            raise ValueError("a recipe holds at most one block-correction stage")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @property
    def layer_stages(self) -> list[StageBase]:
        """The stages that compress linears, allocators included (they run as layer stages once
        their plan is made)."""
        return [s for s in self.stages if s.kind in ("layer", "allocator")]

    @property
    def allocator(self) -> StageBase | None:
        return next((s for s in self.stages if s.kind == "allocator"), None)

    @property
    def correction(self) -> DACStage | None:
        return next((s for s in self.stages if s.kind == "correction"), None)

    @property
    def rotation(self) -> RotationStage | None:
        return next((s for s in self.stages if s.kind == "transform"), None)

    def harp_grid(self) -> tuple[int, int, bool]:
        """``(bits, group_size, sym)`` the HARP proxy fits against."""
        stage = self.rotation
        quant = next((s for s in self.layer_stages if isinstance(s, UniformQuantStage)), None)
        bits = stage.bits if stage.bits is not None else getattr(quant, "bits", None)
        if bits is None:
            raise RecipeError("a harp stage with no quantizer after it needs `bits` (and `group_size`) for its proxy")
        group = stage.group_size if stage.group_size is not None else getattr(quant, "group_size", -1)
        sym = stage.sym if stage.sym is not None else getattr(quant, "sym", False)
        return bits, group, sym


# -- loading -----------------------------------------------------------------------------------

def shipped_recipes() -> dict[str, Path]:
    folder = resources.files("llmpress") / "recipes"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def _closest(word: str, choices) -> str:
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def _explain(err: ValidationError, data: dict) -> str:
    # A misspelt key also makes the real key "missing": name the misspelling, it is the cause.
    errors = err.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = [str(x) for x in first["loc"]]
    where = ""
    if len(loc) >= 2 and loc[0] == "stages":
        idx = int(loc[1])
        method = data.get("stages", [{}])[idx].get("method", "?") if isinstance(data.get("stages"), list) else "?"
        where = f"stage {idx + 1} ({method})"
        loc = loc[3:] if len(loc) > 2 and loc[2] in STAGE_TYPES else loc[2:]
    key = loc[-1] if loc else ""
    if first["type"] == "extra_forbidden":
        stage_cls = None
        if where:
            idx = int(first["loc"][1])
            stage_cls = STAGE_TYPES.get(data["stages"][idx].get("method"))
        fields = stage_cls.model_fields if stage_cls else Recipe.model_fields
        return f"unknown key {key!r} in {where or 'recipe'}{_closest(key, fields)}"
    if first["type"] == "union_tag_invalid" or first["type"] == "union_tag_not_found":
        tag = first.get("ctx", {}).get("tag", "")
        return f"unknown method {tag!r} in {where or 'recipe'}; known: {', '.join(STAGE_TYPES)}{_closest(tag, STAGE_TYPES)}"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{where + ': ' if where else ''}{'.'.join(loc) + ': ' if loc else ''}{msg}"


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with a `stages` list")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{source}: {_explain(e, data)}") from None


def _coerce(value: str) -> Any:
    return yaml.safe_load(value)


def apply_settings(data: dict, settings: list[str] | None) -> dict:
    """Apply ``key=value`` settings (``--set``) to every layer stage that has the key."""
    if not settings:
        return data
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set expects key=value, got {item!r}")
        applied = False
        for stage in data.get("stages", []):
            cls = STAGE_TYPES.get(stage.get("method"))
            if cls is not None and key in cls.model_fields:
                stage[key] = _coerce(value)
                applied = True
        if not applied:
            known = {f for c in STAGE_TYPES.values() for f in c.model_fields}
            raise RecipeError(f"--set {key}: no stage of this recipe has that key{_closest(key, known)}")
    return data


def drop_stages(data: dict, methods: list[str] | None) -> dict:
    """Remove the stages of the named methods (``--drop``: ablations such as a preset without its
    rotation or correction); a method the recipe does not have is an error."""
    if not methods:
        return data
    stages = data.get("stages", [])
    for method in methods:
        if not any(isinstance(st, dict) and st.get("method") == method for st in stages):
            present = [st.get("method") for st in stages if isinstance(st, dict)]
            raise RecipeError(f"--drop {method}: the recipe has no such stage (its stages: {', '.join(map(str, present))})")
        stages = [st for st in stages if not (isinstance(st, dict) and st.get("method") == method)]
    if not stages:
        raise RecipeError("--drop removed every stage of the recipe")
    data["stages"] = stages
    return data


def load_recipe(name_or_path: str, settings: list[str] | None = None, drop: list[str] | None = None) -> Recipe:
    """A shipped preset by name, or a YAML file; ``settings`` are ``key=value`` overrides and
    ``drop`` the methods whose stages are removed."""
    shipped = shipped_recipes()
    path = Path(name_or_path).expanduser()
    if name_or_path in shipped:
        path, source = shipped[name_or_path], name_or_path
    elif path.suffix in (".yaml", ".yml") and path.is_file():
        source = str(path)
    else:
        raise RecipeError(f"no recipe named {name_or_path!r}{_closest(name_or_path, shipped)} (see `llmpress recipes`)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None
    if isinstance(data, dict):
        data = _customized(data, settings, drop, path.stem)
    return parse_recipe(data, source)


def customize_recipe(recipe: Recipe, settings: list[str] | None = None, drop: list[str] | None = None) -> Recipe:
    """``recipe`` with ``--set`` settings and ``--drop`` applied, as :func:`load_recipe` applies them."""
    if not settings and not drop:
        return recipe
    return parse_recipe(_customized(recipe.model_dump(mode="json"), settings, drop, recipe.name), recipe.name)


def _customized(data: dict, settings: list[str] | None, drop: list[str] | None, default_name: str) -> dict:
    data = apply_settings(drop_stages(data, drop), settings)
    changes = [*(settings or []), *(f"-{m}" for m in drop or [])]
    if changes:   # the name says what was run: "gptq-w4 [group_size=32]", "d2quant-w2-g64 [-dac]"
        data["name"] = f"{data.get('name') or default_name} [{', '.join(changes)}]"
    return data
