"""The executor's two shortcuts to a block's outputs (docs/pipeline.md, "The sequential executor").

- The residual linear's stage yields the block's outputs without another pass: the linear stands
  in as ``ZeroOutput`` while its inputs are recorded, so the block returns ``h``, and
  ``add_residual_outputs`` adds ``X Ŵᵀ + b`` once ``Ŵ`` is solved.
- Once the attention's output linear is compressed, the attention's output is fixed: it is computed
  once from that linear's kept inputs (``attention_outputs``) and a ``CachedAttention`` returns it
  for every later stage of the block (checked against the real attention on each stage's first
  batch: ``AttentionCacheMismatch`` sends the executor back to the real module), with a
  ``SkippedNorm`` in place of the norm that only fed it.
"""

from __future__ import annotations

import torch
from torch import nn

from .stats import Slabs


def batch_ranges(n: int, batch_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


class ZeroOutput(nn.Module):
    """Stands in for the residual linear during its stage: records its input (through the
    statistics hooks) and adds nothing, so the block returns ``h``, the residual stream without
    that linear; the exact block output is then ``h + X Ŵᵀ + b`` once ``Ŵ`` is solved."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


class AttentionCacheMismatch(Exception):
    pass


class CachedAttention(nn.Module):
    """Stands in for a block's attention once all its linears are compressed: returns, batch by
    batch, the output computed once from the kept inputs of its output linear. The first call of
    every stage runs the real attention and checks that it returns exactly that output (as stored:
    bf16 activations keep it rounded to bf16, the one place where they change a block's output)."""

    def __init__(self, real: nn.Module, outputs: list[torch.Tensor]):
        super().__init__()
        self.real, self.outputs = real, outputs
        self.calls, self.arity, self.verified, self.dtype, self.device = 0, None, False, None, None

    def restart(self) -> None:
        self.calls = 0

    def forward(self, *args, **kwargs):
        batch = self.calls
        self.calls += 1
        if not self.verified:
            out = self.real(*args, **kwargs)
            first = out[0] if isinstance(out, tuple) else out
            cached = self.outputs[batch].to(first.device)   # kept in RAM when the block runs on a GPU
            if first.shape != cached.shape or not torch.equal(first.to(cached.dtype), cached):
                raise AttentionCacheMismatch
            self.arity = len(out) if isinstance(out, tuple) else None
            self.verified, self.dtype, self.device = True, first.dtype, first.device
            return out
        cached = self.outputs[batch].to(self.device, self.dtype)
        return cached if self.arity is None else (cached,) + (None,) * (self.arity - 1)


class SkippedNorm(nn.Module):
    """Stands in for the norm that only feeds a cached attention: once the cache is verified its
    output is never read, so it returns its input instead of normalizing ~150 MB per stage."""

    def __init__(self, real: nn.Module, attention: CachedAttention):
        super().__init__()
        self.real, self.attention = real, attention

    def forward(self, x, *args, **kwargs):
        return x if self.attention.verified else self.real(x, *args, **kwargs)


@torch.no_grad()
def attention_outputs(inputs, proxy: nn.Linear, dtype: torch.dtype) -> list[torch.Tensor]:
    """The attention's output per batch from its output linear's kept inputs, stored as ``dtype``:
    written over each input where shape and dtype agree (no second stream's worth of memory), else
    each input is freed as its output is made. The proxy computes where it is; the outputs stay
    where the inputs were kept."""
    outputs, slabs = [], Slabs()
    for x in inputs.drain():
        y = proxy(x.to(proxy.weight.device, torch.float32))
        if y.shape == x.shape and x.dtype == dtype:
            outputs.append(x.copy_(y))
        else:
            outputs.append(slabs.copy(y.to(dtype)))
        del x, y
    return outputs


@torch.no_grad()
def add_residual_outputs(name: str, hidden: torch.Tensor, inputs, proxy: nn.Linear, batch_size: int) -> None:
    """The block's outputs from the residual linear's kept inputs, per token (OPT flattens tokens
    before its MLP): ``h += X Ŵᵀ + b`` in place; the kept inputs are then closed."""
    for b, (s, e) in enumerate(batch_ranges(hidden.shape[0], batch_size)):
        x = inputs[b].reshape(-1, proxy.in_features).to(proxy.weight.device, torch.float32)
        target = hidden[s:e].view(-1, proxy.out_features)
        if x.shape[0] != target.shape[0]:
            raise RuntimeError(f"{name}: its inputs do not line up with the block's tokens")
        target += proxy(x).to(target.device)
    inputs.close()
