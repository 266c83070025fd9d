"""Values a layer derives from its stored tensors for a kernel (torch's int4 layout, float scales,
decoded codes): built on first use, kept while those tensors are unchanged."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


class Derived(Generic[T]):
    """One derived value and the key it was built under. ``key()`` reads the source tensors' data
    pointers and version counters, so a reassigned or in-place changed tensor rebuilds the value.
    While torch.compile traces, the value an eager call built is taken as it is: a graph cannot read
    version counters and holds the value as a constant (a weight changed after compilation is not
    seen by the compiled step)."""

    def __init__(self) -> None:
        self._entry: tuple[tuple, T] | None = None

    def get(self, key: Callable[[], tuple], build: Callable[[], T]) -> T:
        entry = self._entry
        if entry is not None and torch.compiler.is_compiling():
            return entry[1]
        current = key()
        if entry is None or entry[0] != current:
            entry = self._entry = (current, build())
        return entry[1]
