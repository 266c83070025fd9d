"""Streaming per-linear input statistics, collected through forward pre-hooks.

Linears that read the very same input tensor in a forward (q/k/v, gate/up) share one
accumulator: the Hessian is computed once per distinct input, not once per linear.
"""

from __future__ import annotations

import torch
from torch import nn


class StopForward(Exception):
    """Raised from a hook once every input a stage needs has been seen: the rest is not run."""


class InputStats:
    """Accumulates ``Σ x xᵀ`` (fp32) of each watched linear's input over calibration batches.

    ``keep_inputs`` names linears whose raw inputs are also kept (per batch, in order).
    ``stop_when_seen``: raise :class:`StopForward` once all watched linears have run in a forward.
    """

    def __init__(self, modules: dict[str, nn.Module], *, keep_inputs=(), stop_when_seen: bool = True):
        self.modules = modules
        self.keep = set(keep_inputs)
        self.stop_when_seen = stop_when_seen
        self.owner: dict[str, str] = {}             # linear -> linear whose accumulator it shares
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.kept: dict[str, list[torch.Tensor]] = {n: [] for n in self.keep}
        self._seen_this_forward: dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> InputStats:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def begin_batch(self) -> None:
        self._seen_this_forward.clear()

    def _hook(self, name: str):
        def hook(_module, args):
            x = args[0]
            if name not in self.owner:
                self.owner[name] = next((o for o, t in self._seen_this_forward.items() if t is x), name)
            self._seen_this_forward[name] = x
            owner = self.owner[name]
            if owner == name:
                flat = x.reshape(-1, x.shape[-1]).to(torch.float32)
                if name not in self.sums:
                    self.sums[name] = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float32)
                    self.tokens[name] = 0
                self.sums[name].addmm_(flat.T, flat)
                self.tokens[name] += flat.shape[0]
            if name in self.keep:
                self.kept[name].append(x.detach().clone())
            if self.stop_when_seen and len(self._seen_this_forward) == len(self.modules):
                raise StopForward
        return hook

    def hessian(self, name: str) -> torch.Tensor:
        """``H = 2/N Σ x xᵀ`` of the linear's input (the reference scaling; damping is relative)."""
        owner = self.owner.get(name)
        if owner is None:
            raise RuntimeError(f"no statistics were collected for {name}: it never ran on calibration data")
        return self.sums[owner] * (2.0 / max(self.tokens[owner], 1))

    def hessians(self) -> dict[str, torch.Tensor]:
        cache: dict[str, torch.Tensor] = {}
        return {n: cache.setdefault(self.owner[n], self.hessian(n)) for n in self.modules if n in self.owner}
