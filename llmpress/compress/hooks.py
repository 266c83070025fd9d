"""Block hooks: what a block-level method does at fixed points while a block is compressed.

D²Quant's mean-shift correction, DSQ's column-scale absorption and any later block-wise method
(block tuning) act on a whole block rather than one linear. Each registers a ``BlockHooks``
subclass (``register(..., hooks=...)``); the executor makes one instance per stage and block and
calls its points in this order, knowing no method by name:

``check`` (every block's plan, before any work) → ``start`` → per group of linears:
``before_group`` → statistics (``keeps_output_shortcut`` decides whether the block's outputs may
be taken as ``h + XŴᵀ``) → ``processors`` (changes of basis some linears are solved in) → per
linear ``after_solve`` → ``after_group`` → the block's outputs →
``end`` (before the packed modules go back in) → ``outputs_ready`` (the outputs are final).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .arch import ArchMap


@dataclass
class BlockContext:
    """What a hook sees of the block in work."""

    index: int
    block: nn.Module
    prefix: str
    plan: Any                                  # the block's BlockPlan: which stage compresses which linear
    arch: ArchMap
    model: nn.Module
    last: bool                                 # the model's last block
    run: Callable[..., None]                   # runs the block over every calibration batch
    hidden: torch.Tensor | None                # the block's input stream (its outputs once ready)
    batch_size: int
    describe: Callable[[str], None]            # the progress line
    emit: Callable[[str, Any], None]           # a value kept in the run state with this block
    kwargs: Any = None                         # the block's other arguments, per calibration batch
    # the original block's outputs on the full-precision model's own stream (where a stage asks)
    fp_outputs: torch.Tensor | None = None
    modules: dict[str, nn.Module] = field(default_factory=dict)   # compressed so far, by name in the block
    # where the block runs; the compressed modules stay on the CPU (their proxies run here), and
    # the streams may be in RAM
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)   # their metrics
    forward_dtype: torch.dtype = torch.float32   # precision of ``run``'s forward passes (passes.forward_precision)


@dataclass
class Solved:
    """One linear just compressed, as the hooks see it."""

    name: str
    stage: Any
    module: nn.Module
    input_scale: torch.Tensor | None   # a per-input scale its weight still needs (absorbed upstream, or kept)
    changed: bool = False              # a hook changed what the module computes: its dense weight is read again


@dataclass
class LinearProcessor:
    """An exact change of basis around one linear, given by a block stage before the layer method
    runs: the method compresses ``weight`` on ``stats`` (both in the new bases, the bias left out)
    and ``wrap(module, bias, dtype)`` makes the stored module compute the original function."""

    weight: torch.Tensor
    stats: dict
    wrap: Callable[[nn.Module, torch.Tensor | None, torch.dtype], nn.Module]
    metrics: dict[str, float] = field(default_factory=dict)


class BlockHooks:
    """Every point a no-op; a method overrides the points it acts at."""

    @classmethod
    def check(cls, stage: Any, plan: Any, arch: ArchMap) -> None:
        """Refuse a plan this method cannot serve, before any work."""

    @classmethod
    def needs_final_outputs(cls, stage: Any) -> bool:
        """Whether the last block's outputs are needed (they are otherwise never computed)."""
        return False

    @classmethod
    def needs_full_precision_stream(cls, stage: Any) -> bool:
        """Whether this method reads the full-precision model's own outputs of each block
        (``BlockContext.fp_outputs``): the executor then keeps that stream through every block."""
        return False

    @classmethod
    def linear_needs(cls, stage: Any) -> frozenset[str]:
        """Statistics this method reads of every compressed linear, beyond its layer stage's."""
        return frozenset()

    def __init__(self, stage: Any):
        self.stage = stage

    def start(self, ctx: BlockContext) -> None: ...

    def before_group(self, ctx: BlockContext, group: tuple[str, ...]) -> None: ...

    def keeps_output_shortcut(self, ctx: BlockContext, members: list[str]) -> bool:
        return True

    def keeps_attention_cache(self, ctx: BlockContext) -> bool:
        """Whether later groups may see the attention as its cached output (else the real module runs)."""
        return True

    def processors(self, ctx: BlockContext, stats: dict[str, dict]) -> dict[str, LinearProcessor]:
        """Changes of basis for some of the group's linears (``stats``: each one's statistics),
        after the statistics and before the solves."""
        return {}

    def after_solve(self, ctx: BlockContext, solved: Solved) -> None: ...

    def after_group(self, ctx: BlockContext, group: tuple[str, ...]) -> None: ...

    def end(self, ctx: BlockContext) -> None: ...

    def outputs_ready(self, ctx: BlockContext) -> None: ...
