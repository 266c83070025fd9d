"""What an output folder holds, for ``llmpress inspect``: each compressed module's format and
bits per weight, the dense tensors' storage, the run's recipe and transforms."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..layers import LAYER_FORMATS, module_sizes
from ..layers.experts import expert_pattern
from .checkpoint import read_manifest

_SAFETENSORS_DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I8": "int8",
                            "U8": "uint8", "I32": "int32", "I64": "int64"}
_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int8": 1, "uint8": 1, "int32": 4, "int64": 8}
_BLOCK = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<module>.+)$")


@dataclass
class ModuleRow:
    name: str                 # the full name in the model
    block: int | None         # the decoder block it sits in (None outside the blocks)
    module: str               # its name within the block (mlp.down_proj)
    format: str
    bits: str
    group: str
    act_order: str
    layout: str
    bits_per_weight: float

    @property
    def pattern(self) -> str:
        """The module's name with a routed expert's index folded (``mlp.experts.*.up_proj``)."""
        return expert_pattern(self.module)

    def kind(self) -> tuple:
        """What makes two modules of different blocks (or two experts) fold into one row."""
        return (self.pattern, self.format, self.bits, self.group, self.act_order, self.layout,
                round(self.bits_per_weight, 3))


@dataclass
class FoldedRow:
    blocks: str               # "0-29", "0-3,5-29"
    count: int
    row: ModuleRow


@dataclass
class FolderSummary:
    folder: str
    modules: list[ModuleRow]
    dense_mb: dict[str, float]    # storage dtype -> MB of tensors outside compressed modules
    size_mb: float
    recipe: str
    base_model: Any
    llmpress_version: Any
    calibration: Any
    transforms: list[str] = field(default_factory=list)
    bits_per_weight: float | None = None


def _split_name(name: str) -> tuple[int | None, str]:
    m = _BLOCK.match(name)
    return (int(m["index"]), m["module"]) if m else (None, name)


def block_ranges(blocks: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    parts, run = [], []
    for b in sorted(blocks):
        if run and b == run[-1] + 1:
            run.append(b)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [b]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def fold(rows: list[ModuleRow]) -> list[FoldedRow]:
    """One row per module kind that is identical across blocks, in first-seen order."""
    groups: dict[tuple, list[ModuleRow]] = {}
    for row in rows:
        groups.setdefault(row.kind(), []).append(row)
    folded = []
    for members in groups.values():
        blocks = [r.block for r in members if r.block is not None]
        folded.append(FoldedRow(blocks=block_ranges(blocks) if blocks else "–", count=len(members),
                                row=replace(members[0], module=members[0].pattern)))
    return folded


def _dense_mb(folder: Path, compressed: list[str]) -> dict[str, float]:
    from safetensors import safe_open

    prefixes = tuple(f"{name}." for name in compressed)
    out: dict[str, float] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle)
                if key.startswith(prefixes):
                    continue
                view = f.get_slice(key)
                dtype = _SAFETENSORS_DTYPE_NAMES.get(view.get_dtype(), view.get_dtype().lower())
                numel = 1
                for d in view.get_shape():
                    numel *= d
                width = _DTYPE_BYTES.get(dtype, 4)
                out[dtype] = out.get(dtype, 0.0) + numel * width / 1e6
    return {k: round(v, 2) for k, v in out.items()}


def _describe_transform(t: dict) -> str | None:
    if t.get("kind") != "rotation":
        return None
    parts = [f"{t.get('method')} seed {t.get('seed')}"]
    parts += ["residual stream"] if t.get("residual") else []
    parts += ["within heads"] if t.get("heads") else []
    online = t.get("online_hadamard")
    if online:
        parts.append(f"online Hadamard ({online.get('size')}) on {len(online.get('modules', []))} modules")
    return "rotation: " + ", ".join(parts)


def summarize(folder: Path) -> FolderSummary:
    manifest = read_manifest(folder)
    sizes = module_sizes(manifest["modules"])
    rows = []
    for name, entry in manifest["modules"].items():
        bits, weights = sizes[name]
        block, module = _split_name(name)
        layout = LAYER_FORMATS[entry["format"]].describe(entry["params"])
        rows.append(ModuleRow(name, block, module, entry["format"], layout.bits, layout.group, layout.act_order,
                              layout.detail, bits / weights))
    total_bits, total_weights = sum(b for b, _ in sizes.values()), sum(w for _, w in sizes.values())
    transforms = [d for t in manifest.get("transforms") or [] if isinstance(t, dict) and (d := _describe_transform(t))]
    return FolderSummary(
        folder=str(folder), modules=rows, dense_mb=_dense_mb(folder, list(manifest["modules"])),
        size_mb=round(sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6, 2),
        recipe=manifest.get("recipe", {}).get("name", "?"), base_model=manifest.get("base_model"),
        llmpress_version=manifest.get("llmpress_version"), calibration=manifest.get("calibration"),
        transforms=transforms, bits_per_weight=total_bits / total_weights if total_weights else None,
    )
