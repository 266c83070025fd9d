"""An allocator stage's plan for one run (ROCKET's knapsack, ShiftAdd's bit widths, mixed widths):
profile every selected linear once (cached across runs), solve the knapsack, and write the
chosen settings into the recipe as per-module overrides before the blocks run."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError
from ..io.models import STORAGE_DTYPES
from ..layers.experts import is_expert_linear
from ..progress import Progress
from ..version import __version__
from . import distributed
from .arch import ArchMap, arch_for, blocks_of
from .compressors import identity_hessian, linear_weight
from .passes import BlockWeights, dense_block_pass
from .recipe import Recipe
from .rotate.fuse import ResidualRotation
from .run import _Job, _StreamedWeights
from .stats import InputStats

ALLOCATION_FILE = "llmpress-allocation.json"


def allocate(job: _Job, rotation: ResidualRotation | None, *, progress: bool,
              trust_remote_code: bool) -> tuple[Recipe, dict[str, Any]]:
    """Profile every selected linear (of the ``rotation``-rotated model), solve the knapsack, and
    return the recipe with the plan written into its allocator stage (each module's chosen settings
    as ``overrides``; dense layers ``ignore``d) and the plan's summary. The plan is saved in the
    output folder first, so ``--resume`` reuses it instead of profiling again."""
    import re
    from collections import Counter

    from ..paths import atomic_write_text
    from .factor.knapsack import Option, allocate_layers
    from .report import plot_allocation

    index, stage = next((i, s) for i, s in enumerate(job.recipe.stages) if s.kind == "allocator")
    path = job.out / ALLOCATION_FILE
    if path.exists():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            choice = {str(n): None if c is None else Option(**c) for n, c in saved["choice"].items()}
            summary = dict(saved["summary"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelLoadError(f"{path} is damaged; delete it (or the folder) and run again") from None
    else:
        start = time.perf_counter()
        tables, dense_bits, dense_width = _profile(job, stage, rotation, progress=progress,
                                                   trust_remote_code=trust_remote_code)
        target = stage.removed_target(dense_width)
        plan = allocate_layers(tables, dense_bits, target, stage.buckets, stage.safety_cap, stage.keep_dense)
        choice = plan.choice
        kinds = Counter(_option_kind(c) for c in choice.values())
        summary = {
            "target removed": round(target, 4), "removed (stored bits)": round(plan.removed, 4),
            "bits per weight": round(plan.stored_bits / (plan.dense_bits / dense_width), 4),
            "layers": dict(sorted(kinds.items())),
            "error cap": None if plan.cap is None else round(plan.cap, 4),
            **_heuristic_agreement(tables),
            "profile (s)": round(time.perf_counter() - start, 1),
        }
        if distributed.is_main():
            atomic_write_text(path, json.dumps({
                "summary": summary,
                "choice": {n: None if c is None else c.__dict__ for n, c in choice.items()},
            }, indent=1))
            plot_allocation({n: 0.0 if c is None else c.removed for n, c in choice.items()}, target,
                            job.out / "llmpress-allocation.png")
    overrides, ignore = dict(stage.overrides), list(stage.ignore)
    for name, c in choice.items():
        pattern = f"^{re.escape(name)}$"
        if c is None:
            ignore.append(pattern)
        else:
            overrides[pattern] = dict(c.settings)
    stages = list(job.recipe.stages)
    stages[index] = stage.model_copy(update={"overrides": overrides, "ignore": ignore})
    return job.recipe.model_copy(update={"stages": stages}), summary


def _heuristic_agreement(tables) -> dict[str, float]:
    """Where the options carry a reference heuristic's sensitivity score (ShiftAdd's), Kendall's τ
    between its ranking of the layers and ours: the measured error saved per extra code bit."""
    scores, gains = [], []
    for options in tables.values():
        if len(options) < 2 or "heuristic" not in options[0].detail:
            continue
        low, high = min(options, key=lambda o: o.bits), max(options, key=lambda o: o.bits)
        scores.append(options[0].detail["heuristic"])
        gains.append((low.error - high.error) / max(high.bits - low.bits, 1))
    if len(scores) < 3:
        return {}
    from scipy.stats import kendalltau

    return {"kendall tau vs ShiftAdd's ranking heuristic": round(float(kendalltau(scores, gains).statistic), 3)}


def _option_kind(option) -> str:
    """A short name for what a layer became, for the run summary."""
    if option is None:
        return "dense"
    settings = option.settings
    if "family" in settings:
        return str(settings["family"])
    if "bits" in settings:
        return f"{settings['bits']} bits"
    return "sparse coefficients" if settings.get("nnz") is not None else "low rank"


def _profile(job: _Job, stage, rotation: ResidualRotation | None, *, progress: bool, trust_remote_code: bool):
    """``(options, dense bits)`` per selected linear, and the width of a dense weight in bits.
    They depend on the model, the calibration windows and the stage's option grid, not on the
    target, so they are cached (under ``cache_dir()/profiles``) and a second budget on the same
    model skips the profiling pass."""
    from ..paths import atomic_write_text, cache_dir
    from .factor.knapsack import Option
    from .stage import method_of

    grid = stage.model_dump(exclude={"target", "average_bits", "buckets", "safety_cap", "overrides"})
    rotation_stage = job.recipe.rotation.model_dump(mode="json") if job.recipe.rotation is not None else None
    key = hashlib.sha256(json.dumps({
        "model": str(job.folder), "config": job.config.to_dict(), "calibration": job.calib, "stage": grid,
        "rotation": rotation_stage, "version": __version__, "dense dtype": str(job.dense_dtype),
    }, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = cache_dir() / "profiles" / f"{stage.method}-{key}.json"
    if path.exists():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            tables = {n: [Option(**c) for c in t] for n, t in saved["tables"].items()}
            return tables, {n: int(b) for n, b in saved["dense_bits"].items()}, int(saved["dense_width"])
        except (ValueError, KeyError, TypeError):
            pass   # a damaged cache entry: profile again and replace it
    # Score the layers the pipeline will compress: rotated, names as it sees them.
    weights = _StreamedWeights(job, rotation, trust_remote_code=trust_remote_code)
    arch = rotation.compress_arch() if rotation is not None else arch_for(weights.model)
    values = getattr(stage, "values", None)
    if values:   # a factorization: its values at their stored width, a linear kept dense at the dense tensors'
        value_bits, dense_width = torch.finfo(STORAGE_DTYPES[values]).bits, torch.finfo(job.dense_dtype).bits
    else:        # widths of the working model (BCQ's average bits are counted against them)
        value_bits = dense_width = torch.finfo(job.store.dtype).bits
    dense_bits: dict[str, int] = {}
    options_of = method_of(stage).profile

    def score(name: str, weight: torch.Tensor, hessian: torch.Tensor) -> list[Option]:
        dense_bits[name] = weight.numel() * dense_width
        return options_of(stage, weight, hessian, value_bits)

    tables = profile_blocks(weights.model, arch, distributed.local_slice(job.windows), stage.selects, score,
                            progress=progress, weights=weights, device=job.device)
    del weights
    if distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"tables": {n: [c.__dict__ for c in t] for n, t in tables.items()},
                                            "dense_bits": dense_bits, "dense_width": dense_width}))
    return tables, dense_bits, dense_width


@torch.no_grad()
def profile_blocks(
    model: nn.Module, arch: ArchMap, windows: torch.Tensor, select: Callable[[str], bool],
    score: Callable[[str, torch.Tensor, torch.Tensor], Any], *, batch_size: int = 8, progress: bool = True,
    weights: BlockWeights | None = None, device: torch.device = torch.device("cpu"),
) -> dict[str, Any]:
    """``score(name, weight, hessian)`` for every selected linear of the unchanged model, block by
    block on the full-precision stream (the profiling pass of an allocator: its candidates must be
    known for every layer before any layer is compressed). ``weights`` streams the blocks' weights
    (default: ``model`` holds them all). The blocks and their statistics run on ``device``; the
    scores get CPU tensors (the candidates' solves are CPU code)."""
    results: dict[str, Any] = {}
    cpu = torch.device("cpu")
    with Progress(len(blocks_of(model, arch)), progress, title="profile") as bar:
        for i, block, run in dense_block_pass(model, arch, windows, batch_size, weights, device):
            prefix = f"{arch.blocks}.{i}"
            names = [n for n in arch.linears_in(block) if select(f"{prefix}.{n}")]
            bar.describe(f"block {i + 1} · statistics")
            with InputStats({n: block.get_submodule(n) for n in names}, stop_when_seen=False) as stats:
                run(stats=stats)
            stats.all_reduce()
            idle = [n for n in names if is_expert_linear(n)]
            hessians = stats.hessians(missing_ok=idle) if names else {}
            for n in names:
                bar.describe(f"block {i + 1} · {n} · candidates")
                weight = linear_weight(block.get_submodule(n)).to(cpu)
                hessian = hessians[n].to(cpu) if n in hessians else identity_hessian(weight.shape[1])   # never picked
                results[f"{prefix}.{n}"] = score(f"{prefix}.{n}", weight, hessian)
            bar.advance()
    return results
