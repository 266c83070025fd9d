"""Outputs computed for a whole group from one input (linears that share it: an int4 GEMM over
q/k/v, a HARP group's processors), held for the members not yet called with it."""

from __future__ import annotations

import torch


def same_optional(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether two optional index tensors (act-order's ``g_idx``, a held ``input_order``) are both
    absent or equal: linears that read one input the same way agree on them."""
    return a is b or (a is not None and b is not None and torch.equal(a, b))


class HeldOutputs:
    """The first member called with an input computes every member's output; each other member,
    called with that very tensor (unchanged since: its version counter), takes its own. A member
    called with anything else finds nothing and computes afresh, so holding can cost time but never
    change a result."""

    def __init__(self) -> None:
        self._held: tuple[torch.Tensor, int, dict[int, torch.Tensor]] | None = None

    def take(self, member, x: torch.Tensor) -> torch.Tensor | None:
        held = self._held
        # a traced graph (torch.compile) has no version counters: there identity is what it knows
        fresh = torch.compiler.is_compiling() or held is not None and held[1] == x._version
        if held is None or held[0] is not x or not fresh or id(member) not in held[2]:
            return None
        y = held[2].pop(id(member))
        if not held[2]:
            self._held = None
        return y

    def keep(self, x: torch.Tensor, members, outputs, caller) -> torch.Tensor:
        """Hold every member's output for ``x`` but the caller's, which is returned."""
        mine, others = None, {}
        for m, y in zip(members, outputs, strict=True):
            if m is caller:
                mine = y
            else:
                others[id(m)] = y
        self._held = (x, None if torch.compiler.is_compiling() else x._version, others)
        return mine


class SharedInputGroup:
    """Linears that read one input tensor, computed together on one kernel path (``path``, the one
    ``kernels.dispatch.select_path`` names): the first member called with an input computes every
    member's output (``compute``); each other member, called with that very tensor (unchanged
    since), takes its own. A member called with anything else computes afresh, so the grouping can
    cost time but never change a result."""

    path: str = ""

    def __init__(self, members) -> None:
        self.members = list(members)
        self._held = HeldOutputs()

    def compute(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every member's output for ``x``, biases included, in ``x``'s dtype."""
        raise NotImplementedError

    def output(self, member, x: torch.Tensor) -> torch.Tensor:
        y = self._held.take(member, x)
        if y is not None:
            return y
        return self._held.keep(x, self.members, self.compute(x), member)
