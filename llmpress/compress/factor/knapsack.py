"""The shared budget solver: a multiple-choice knapsack over layers.

Every layer offers a few options, each with a measured cost (the error it adds) and a size (what
it stores, in any unit: parameters, bits). One option is taken per layer; the total size must stay
within the budget and the total cost is minimised. ROCKET's allocation, bit allocation and the
family choice of tensor-train compression are all this problem.

The solver is a dynamic programme over layers on integer sizes, exact for those sizes. Real sizes
are mapped to integers by ``discretize``, which rounds every size *up* and the capacity *down*, so
a solution of the integer problem always respects the real budget (the price is that options very
close to the budget may be missed; ``buckets`` sets the resolution).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class InfeasibleBudget(ValueError):
    """No choice of options fits the budget (even the smallest option of every layer is too big)."""


def solve_mckp(costs: Sequence[Sequence[float]], sizes: Sequence[Sequence[int]], capacity: int) -> list[int]:
    """The option per layer minimising ``Σ cost`` subject to ``Σ size ≤ capacity`` (integer sizes).

    ``dp[c]`` holds the least cost of the layers seen so far with total size exactly ``c``; each layer
    is one vectorised min over its options of the shifted table. Memory: one ``int16`` choice per
    (layer, size) for the backtrack.
    """
    if capacity < 0:
        raise InfeasibleBudget(f"capacity {capacity} is negative")
    inf = np.inf
    dp = np.full(capacity + 1, inf)
    dp[0] = 0.0
    choices = np.zeros((len(costs), capacity + 1), dtype=np.int16)
    for layer, (cost, size) in enumerate(zip(costs, sizes, strict=True)):
        cost, size = np.asarray(cost, dtype=np.float64), np.asarray(size, dtype=np.int64)
        if cost.shape != size.shape or cost.ndim != 1 or cost.size == 0:
            raise ValueError(f"layer {layer}: costs and sizes must be equal-length non-empty lists")
        if (size < 0).any():
            raise ValueError(f"layer {layer}: negative size")
        best = np.full(capacity + 1, inf)
        for option in np.argsort(size, kind="stable"):
            w = int(size[option])
            if w > capacity:
                continue
            candidate = np.full(capacity + 1, inf)
            candidate[w:] = dp[: capacity + 1 - w] + cost[option]
            better = candidate < best
            best[better] = candidate[better]
            choices[layer, better] = option
        dp = best
    if not np.isfinite(dp).any():
        raise InfeasibleBudget("no combination of options fits the budget")
    total = int(np.argmin(dp))   # ties: the smallest total size
    picked = []
    for layer in range(len(costs) - 1, -1, -1):
        option = int(choices[layer, total])
        picked.append(option)
        total -= int(np.asarray(sizes[layer])[option])
    return picked[::-1]


@dataclass(frozen=True)
class Discretization:
    unit: float            # real size per integer step
    sizes: list[np.ndarray]
    capacity: int


def discretize(sizes: Sequence[Sequence[float]], budget: float, buckets: int = 50_000) -> Discretization:
    """Integer sizes with ``budget`` mapped to about ``buckets`` steps; sizes round up, the capacity
    down, so an integer solution is a real one."""
    if budget <= 0:
        raise InfeasibleBudget(f"the budget must be positive, got {budget}")
    unit = budget / buckets
    ints = [np.ceil(np.asarray(s, dtype=np.float64) / unit - 1e-9).astype(np.int64) for s in sizes]
    return Discretization(unit=unit, sizes=ints, capacity=int(np.floor(budget / unit + 1e-9)))


def allocate(costs: Sequence[Sequence[float]], sizes: Sequence[Sequence[float]], budget: float,
             buckets: int = 50_000) -> list[int]:
    """:func:`solve_mckp` on real-valued sizes (bits, parameters) under a real budget."""
    d = discretize(sizes, budget, buckets)
    return solve_mckp(costs, d.sizes, d.capacity)


# -- per-layer allocation ------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    """One way to compress one layer: the fraction of its stored bits removed, the error it adds
    (relative output error), the bits it stores, and the stage settings that produce it."""

    removed: float
    error: float
    bits: int
    settings: dict[str, Any] = field(default_factory=dict)
    detail: dict[str, float] = field(default_factory=dict)   # diagnostics for the summary, not settings


@dataclass
class Allocation:
    choice: dict[str, Option | None]   # None: the layer stays dense
    cap: float | None
    dense_bits: int
    stored_bits: int

    @property
    def removed(self) -> float:
        return 1.0 - self.stored_bits / self.dense_bits


SAFETY_ALPHAS = tuple(round(1.0 + 0.1 * i, 1) for i in range(11))


def safety_cap(tables: dict[str, list[Option]], dense_bits: dict[str, int], target: float) -> float | None:
    """ROCKET's per-layer cap: ``ē`` is the mean error at the option nearest the target; the cap
    is ``α·ē`` with the smallest α in 1.0..2.0 whose greedy rule ("every layer takes its largest
    removal with error ≤ α·ē") removes at least the target. None when no α does (the reference
    code crashes there): the knapsack then runs uncapped."""
    nearest = [min(t, key=lambda c: abs(c.removed - target)).error for t in tables.values() if t]
    if not nearest:
        return None
    mean = sum(nearest) / len(nearest)
    total = sum(dense_bits.values())
    for alpha in SAFETY_ALPHAS:
        saved = sum(
            max((dense_bits[n] - c.bits for c in t if c.error <= alpha * mean), default=0)
            for n, t in tables.items()
        )
        if saved >= target * total:
            return alpha * mean
    return None


def allocate_layers(tables: dict[str, list[Option]], dense_bits: dict[str, int], target: float,
                    buckets: int = 50_000, cap: bool = False, keep_dense: bool = True) -> Allocation:
    """One option per layer (dense when ``keep_dense``, or one of its options) minimising the summed
    error with the stored bits at most ``(1 − target)`` of the dense layers'."""
    limit = safety_cap(tables, dense_bits, target) if cap else None
    names = list(tables)
    dense = [None] if keep_dense else []
    options = [[*dense, *(c for c in tables[n] if limit is None or c.error <= limit)] for n in names]
    costs = [[0.0 if c is None else c.error for c in opts] for opts in options]
    sizes = [[dense_bits[n] if c is None else c.bits for c in opts] for n, opts in zip(names, options)]
    total = sum(dense_bits[n] for n in names)
    picked = allocate(costs, sizes, (1.0 - target) * total, buckets)
    choice = {n: options[i][j] for i, (n, j) in enumerate(zip(names, picked))}
    stored = sum(dense_bits[n] if c is None else c.bits for n, c in choice.items())
    return Allocation(choice, limit, total, stored)
