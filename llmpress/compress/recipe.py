"""Typed recipes: a list of stages that round-trips through YAML and fails with a clear line.

Every stage has a ``method`` that selects its config class. Layer-compressor stages pick the
decoder linears they compress with ``targets``/``ignore`` (regular expressions searched in the
full module name) and may change their settings per module with ``overrides`` (regex -> fields),
in the spirit of llama.cpp's ``--tensor-type``.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import RecipeError
from .stage import RotationStage, StageBase, UniformQuantStage, methods

# One entry per registered method; the union picks the config class by ``method``.
STAGE_TYPES: dict[str, type[BaseModel]] = {name: m.stage for name, m in sorted(methods().items())}
Stage = Annotated[Union[tuple(dict.fromkeys(STAGE_TYPES.values()))], Field(discriminator="method")]  # noqa: UP007


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    description: str = ""
    # Storage of the input embedding and the output head (one tensor when tied): `auto` stores
    # them like every other dense tensor (`--dtype`); `int8` as int8 rows with an fp32 scale each
    # (formats.int8_rows). The runtime reads them as stored and computes in fp32 (layers.stored_dense).
    head: Literal["auto", "float32", "float16", "bfloat16", "int8"] = "auto"
    # Mixture of experts. calibrate_all_experts: every expert's statistics from every calibration
    # token (the outputs still follow the router); otherwise from the tokens routed to it. An expert
    # whose statistics saw fewer than min_expert_tokens tokens is quantized data-free instead (RTN
    # on the stage's grid; other methods with an identity Hessian), and the report lists it.
    calibrate_all_experts: bool = False
    min_expert_tokens: int = Field(16, ge=0)
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
        if kinds.count("tuning") > 1:
            raise ValueError("a recipe holds at most one block-tuning stage")
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
    def correction(self) -> StageBase | None:
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


_RECIPE_SETTINGS = ("head", "calibrate_all_experts", "min_expert_tokens")


def apply_settings(data: dict, settings: list[str] | None) -> dict:
    """Apply ``key=value`` settings (``--set``) to the recipe's own settings (``head``, the experts')
    or to every layer stage that has the key."""
    if not settings:
        return data
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set expects key=value, got {item!r}")
        if key in _RECIPE_SETTINGS:
            data[key] = _coerce(value)
            continue
        applied = False
        for stage in data.get("stages", []):
            cls = STAGE_TYPES.get(stage.get("method"))
            if cls is not None and key in cls.model_fields:
                stage[key] = _coerce(value)
                applied = True
        if not applied:
            known = {f for c in STAGE_TYPES.values() for f in c.model_fields} | set(_RECIPE_SETTINGS)
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
