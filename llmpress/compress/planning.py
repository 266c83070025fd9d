"""Which stage compresses each linear of a block, and in which groups: the executor's plan for one
block (docs/pipeline.md). Groups follow the architecture's true-sequential order; a group of
routed experts whose Hessians would not fit one statistics pass is split into several."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import LlmpressError
from ..layers.experts import is_expert_linear
from . import distributed
from .arch import ArchMap
from .recipe import Recipe
from .stage import StageBase, method_of


@dataclass
class BlockPlan:
    """Which stage compresses each linear of a block, and in which groups."""

    assignment: dict[str, StageBase | None]
    groups: list[tuple[str, ...]]
    linear_needs: frozenset[str] = frozenset()   # what block stages read of every compressed linear
    calibrate_all_experts: bool = False   # every expert sees every token while statistics are taken
    min_expert_tokens: int = 0            # fewer routed tokens: the expert is quantized data-free

    def needs_of(self, name: str) -> frozenset[str]:
        """The statistics linear ``name`` is compressed with: its stage's and the block stages'."""
        stage = self.assignment[name]
        return frozenset() if stage is None else stage.needs | self.linear_needs

    @property
    def needs_data(self) -> bool:
        return any(self.needs_of(n) for n in self.assignment)

    @property
    def fp_linears(self) -> list[str]:
        """Linears whose inputs in the full-precision model are recorded: all that calibrate, as
        soon as one compressor needs them (a linear sharing its input with it may come first)."""
        if not any(s is not None and "fp_inputs" in s.needs for s in self.assignment.values()):
            return []
        return [n for n, s in self.assignment.items() if s is not None and s.needs]


def plan_block(recipe: Recipe, arch: ArchMap, prefix: str, block: nn.Module) -> BlockPlan:
    assignment: dict[str, StageBase | None] = {}
    resolved = arch.groups_in(block)
    for name in (n for group in resolved for n in group):
        full = f"{prefix}.{name}"
        stage = next((s for s in recipe.layer_stages if s.selects(full)), None)
        assignment[name] = stage.for_module(full) if stage is not None else None
    sequential = all(getattr(s, "true_sequential", True) for s in assignment.values() if s is not None)
    groups = list(resolved) if sequential else [tuple(assignment)]
    groups = [chunk for group in groups for chunk in split_experts(group, block, EXPERT_STATS_BYTES)]
    hooks = [(s, method_of(s).hooks) for s in recipe.stages if method_of(s).hooks is not None]
    plan = BlockPlan(assignment, groups, frozenset().union(*(h.linear_needs(s) for s, h in hooks)),
                     recipe.calibrate_all_experts, recipe.min_expert_tokens)
    experts = [n for n in assignment if is_expert_linear(n) and plan.needs_of(n)]
    if experts and distributed.active() and not recipe.calibrate_all_experts:
        # the ranks sum their statistics over the same linears: each must see every expert
        raise LlmpressError(f"{prefix}.{experts[0]}: under torchrun, experts need `calibrate_all_experts: true`")
    paired = [n for n in experts if "fp_inputs" in plan.needs_of(n)]
    if paired and not recipe.calibrate_all_experts:
        # the full-precision and the compressed stream route different tokens to an expert
        raise LlmpressError(f"{prefix}.{paired[0]}: a method that pairs the full-precision model's inputs with the "
                            "compressed model's (GPTAQ, ResComp) needs `calibrate_all_experts: true` on experts")
    return plan


# The Hessians one statistics pass may hold for a group's experts (fp32). A group of more experts is
# split into several passes over the calibration data, each for as many experts as fit: Qwen1.5-MoE's
# 60 gate/up Hessians take 1 GB, DeepSeek-V3's 256 would take 52 GB.
EXPERT_STATS_BYTES = 1 << 30


def split_experts(group: tuple[str, ...], block: nn.Module, budget: int) -> list[tuple[str, ...]]:
    """``group`` as consecutive groups whose routed experts' Hessians fit in ``budget`` bytes (the
    linears of one expert that read one input share one Hessian, so an expert is never split); its
    other linears go with the first. The statistics are the same in one pass or several."""
    experts: dict[str, list[str]] = {}
    others = []
    for name in group:
        if is_expert_linear(name):
            experts.setdefault(name.rsplit(".", 1)[0], []).append(name)
        else:
            others.append(name)
    if not experts:
        return [group]
    chunks, current, used = [], list(others), 0
    for names in experts.values():
        cost = block.get_submodule(names[0]).weight.shape[1] ** 2 * 4
        if used and used + cost > budget:
            chunks.append(tuple(current))
            current, used = [], 0
        current += names
        used += cost
    chunks.append(tuple(current))
    return chunks
