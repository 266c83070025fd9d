"""Where a compression run's time and memory go: wall seconds, FLOPs and peak-RSS growth per phase.

The executor marks its phases (``with phase("solve"):``); a phase's time is exclusive of the phases
nested in it (the Hessian updates run inside the statistics forward, and are counted apart). Nothing
is recorded unless a :class:`PhaseClock` is active (``with PhaseClock() as clock:``), so the marks
cost one attribute read in a normal run. With ``count_linear_flops`` every ``nn.Linear`` call adds
``2·in·out·tokens`` to the phase it runs in; other work adds its own estimate through
:func:`add_flops` (the Gram update, the GPTQ solve).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from torch import nn

from .memory import peak_rss_mb


@dataclass
class PhaseTotals:
    seconds: float = 0.0
    flops: float = 0.0
    calls: int = 0
    peak_growth_mb: float = 0.0   # how much the process's peak RSS rose in this phase (not its nested ones)


class PhaseClock:
    """Accumulates :class:`PhaseTotals` per phase name while active (one at a time)."""

    def __init__(self, count_linear_flops: bool = True):
        self.count_linear_flops = count_linear_flops
        self.totals: dict[str, PhaseTotals] = {}
        self._stack: list[list] = []   # [name, start, seconds and peak growth of nested phases]
        self._hook = None

    def __enter__(self) -> PhaseClock:
        global _active
        if _active is not None:
            raise RuntimeError("a PhaseClock is already recording")
        _active = self
        if self.count_linear_flops:
            self._hook = nn.modules.module.register_module_forward_hook(self._count_linear)
        return self

    def __exit__(self, *exc) -> bool:
        global _active
        _active = None
        if self._hook is not None:
            self._hook.remove()
        return False

    def _count_linear(self, module, args, _output) -> None:
        if isinstance(module, nn.Linear) and args:
            x = args[0]
            self.add_flops(2.0 * module.in_features * module.out_features * (x.numel() // max(x.shape[-1], 1)))

    def add_flops(self, flops: float) -> None:
        if self._stack:
            self._totals(self._stack[-1][0]).flops += flops

    def _totals(self, name: str) -> PhaseTotals:
        if name not in self.totals:
            self.totals[name] = PhaseTotals()
        return self.totals[name]

    @contextlib.contextmanager
    def phase(self, name: str):
        peak = peak_rss_mb()
        entry = [name, time.perf_counter(), 0.0, 0.0]
        self._stack.append(entry)
        try:
            yield
        finally:
            self._stack.pop()
            elapsed = time.perf_counter() - entry[1]
            totals = self._totals(name)
            totals.seconds += elapsed - entry[2]
            totals.calls += 1
            growth = peak_rss_mb() - peak
            totals.peak_growth_mb += growth - entry[3]
            if self._stack:
                self._stack[-1][2] += elapsed
                self._stack[-1][3] += growth


_active: PhaseClock | None = None


def phase(name: str):
    """Mark a phase of the active clock (a no-op context when none is recording)."""
    return _active.phase(name) if _active is not None else contextlib.nullcontext()


def add_flops(flops: float) -> None:
    """Credit ``flops`` to the innermost running phase of the active clock, if any."""
    if _active is not None:
        _active.add_flops(flops)
