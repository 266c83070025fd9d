"""Streaming per-linear input statistics, collected through forward pre-hooks.

Linears that read the very same input tensor in a forward (q/k/v, gate/up) share one
accumulator: the Hessian is computed once per distinct input, not once per linear, and once the
sharing is known (after the first batch) the forward stops at the first linear of each input.
``Σ x xᵀ`` is computed on and above the diagonal only (see :func:`gram_update`).
"""

from __future__ import annotations

import itertools
import os
import tempfile

import torch
from torch import nn

from .phases import add_flops, phase


class StopForward(Exception):
    """Raised from a hook once every input a stage needs has been seen: the rest is not run."""


def gram_update(acc: torch.Tensor, x: torch.Tensor, panel: int = 256) -> None:
    """``acc += xᵀ x`` for ``x`` ``[tokens, n]`` fp32, valid on and above the diagonal of ``acc``
    (call :func:`symmetrize` once at the end).

    Computed in column panels of about ``panel`` with torch's own GEMM, each panel's rows from the
    diagonal on: ``b(b+1)/2`` of ``b²`` blocks (2/3 of a full product for 576 inputs). Not BLAS
    ``ssyrk`` through scipy, although it does half the FLOPs: scipy's OpenBLAS threads spin after
    each call and fight torch's OpenMP threads for the cores. Measured on 2 cores, a 576-wide update
    of 4096 tokens followed by a 576x1536 linear took 103 ms with ``ssyrk`` (9.7 + 45.5 ms apart)
    and 55 ms this way (the statistics forward of GPTQ W4 on SmolLM2 at 128x512: 219 s with
    ``ssyrk``, 149 s without). Runs on any device.
    """
    n = x.shape[1]
    count = max(1, -(-n // panel))
    edges = [n * i // count for i in range(count + 1)]
    for start, stop in itertools.pairwise(edges):
        acc[start:stop, start:].addmm_(x[:, start:stop].T, x[:, start:])
        add_flops(2.0 * x.shape[0] * (stop - start) * (n - start))


def symmetrize(acc: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """Fill the lower triangle of ``acc`` (of which only the upper triangle is valid) in place,
    ``rows`` rows at a time: an 8B model's ``down_proj`` Gram is 822 MB, and the out-of-place
    ``triu(acc) + triu(acc, 1)ᵀ`` held three more of it. Returns ``acc``."""
    n = acc.shape[0]
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        acc[start:stop, :start] = acc[:start, start:stop].T
        square = acc[start:stop, start:stop]
        square.copy_(torch.triu(square) + torch.triu(square, 1).T)
    return acc


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or ±Inf in ``t``, without an ``isfinite`` mask or a float64 copy of it (both as
    large as ``t``): NaN propagates through min/max, an infinity is the min or the max."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def disk_tensor(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A zero tensor backed by a memory-mapped temporary file, unlinked at once (the mapping keeps
    it alive until the tensor is freed): the OS pages it in and out instead of holding it in RAM."""
    handle = tempfile.NamedTemporaryFile(prefix="llmpress-activations-", delete=False)
    try:
        numel = 1
        for d in shape:
            numel *= d
        handle.truncate(numel * torch.empty((), dtype=dtype).element_size())
        handle.close()
        return torch.from_file(handle.name, shared=True, size=numel, dtype=dtype).view(*shape)
    finally:
        os.unlink(handle.name)


class SpillArena:
    """Temporary files that a run's spills reuse, block after block.

    Rewriting pages of an existing file costs ~0.1 s per 400 MB here; creating, filling and
    deleting a fresh file costs ~1.4 s (extent allocation, and discard on delete): reuse saves
    about a second per spill and block on SmolLM2 at 128x512. A spill takes a free file or opens
    a new one; a run holds as many files as it has spills alive at once.
    """

    def __init__(self):
        self._free: list = []
        self._all: list = []

    def acquire(self):
        if not self._free:
            f = tempfile.TemporaryFile(prefix="llmpress-spill-")
            self._all.append(f)
            return f
        return self._free.pop()

    def release(self, file) -> None:
        self._free.append(file)

    def close(self) -> None:
        for f in self._all:
            f.close()
        self._all.clear()
        self._free.clear()


SLAB_BYTES = 64 << 20


class Slabs:
    """Copies of tensors packed into 64 MB buffers: a buffer that size is above the executor's mmap
    threshold (``memory.limit_heap_fragmentation``), so glibc maps it apart and gives it back
    whole when its last view is dropped. A long-lived copy of each batch taken from the heap
    instead would sit between the forward's temporaries and fragment it: measured on SmolLM2 GPTQ
    W4 128x512 (32 MB threshold), peak RSS 1459 MB with per-batch copies, 1350 MB with slabs."""

    def __init__(self):
        self._slab: torch.Tensor | None = None
        self._used = 0

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        size = t.numel() * t.element_size()
        if size >= SLAB_BYTES // 2:
            return t.to("cpu", copy=True)
        if self._slab is None or self._used + size > SLAB_BYTES:
            # page-locked where the copies come from a GPU: they then run at the link's full rate
            self._slab, self._used = torch.empty(SLAB_BYTES, dtype=torch.uint8, pin_memory=t.is_cuda), 0
        view = self._slab[self._used:self._used + size].view(t.dtype).view(t.shape)
        self._used += -(-size // 64) * 64   # keep every view 64-byte aligned
        return view.copy_(t)


class SpilledTensors:
    """A list of tensors that moves to a file once it passes ``budget_bytes``.

    Used for the raw inputs a stage must keep until its linear is solved (down_proj's inputs are
    400 MB in fp32 for SmolLM2 at 128x512): RAM stays flat, the page cache and disk take the rest.
    The file comes from the run's :class:`SpillArena` when there is one, else it is its own. In RAM
    the copies live in :class:`Slabs`.
    """

    def __init__(self, budget_bytes: int = 32 << 20, arena: SpillArena | None = None):
        self.budget = budget_bytes
        self.arena = arena
        self.in_memory: list[torch.Tensor | None] = []   # None: drained
        self._slabs = Slabs()
        self.meta: list[tuple[int, torch.Size, torch.dtype]] = []
        self.file = None
        self._own_file = False
        self._end = 0
        self.bytes = 0

    def append(self, t: torch.Tensor) -> None:
        t = t.detach().contiguous()
        size = t.numel() * t.element_size()
        if self.file is None and self.bytes + size > self.budget:
            if self.arena is not None:
                self.file = self.arena.acquire()
            else:
                self.file, self._own_file = tempfile.TemporaryFile(prefix="llmpress-spill-"), True
            for kept in self.in_memory:
                self._write(kept)
            self.in_memory.clear()
        self.bytes += size
        if self.file is None:
            self.in_memory.append(self._slabs.copy(t))
        else:
            self._write(t)

    def _write(self, t: torch.Tensor) -> None:
        self.file.seek(self._end)
        self.file.write(t.cpu().reshape(-1).view(torch.uint8).numpy())   # as bytes: numpy has no bf16
        self.meta.append((self._end, t.shape, t.dtype))
        self._end += t.numel() * t.element_size()

    def __len__(self) -> int:
        return len(self.meta) if self.file is not None else len(self.in_memory)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.file is None:
            return self.in_memory[i]
        offset, shape, dtype = self.meta[i]
        out = torch.empty(shape, dtype=dtype)
        self.file.seek(offset)
        self.file.readinto(out.reshape(-1).view(torch.uint8).numpy())
        return out

    def drain(self):
        """Yield the tensors in order and close; each one kept in RAM is dropped once the caller
        moves past it, so a list of results built from them does not hold both at once."""
        for i in range(len(self)):
            t = self[i]
            if self.file is None:
                self.in_memory[i] = None
            yield t
            del t
        self.close()

    def close(self) -> None:
        if self.file is not None:
            if self._own_file:
                self.file.close()
            else:
                self.arena.release(self.file)
            self.file = None
        self.in_memory.clear()
        self.meta.clear()
        self._slabs = Slabs()


class _InputHooks:
    """Forward pre-hooks on ``modules`` that find, per batch, which of them read the very same
    input tensor: ``owner[name]`` is the first module seen with that input."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.owner: dict[str, str] = {}
        self._seen: dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self):
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()   # the last batch's inputs (76 MB for one of Qwen2.5 0.5B's down_proj)
        return False

    def _hook(self, name: str):
        def hook(_module, args):
            x = args[0]
            if name not in self.owner:
                self.owner[name] = next((o for o, t in self._seen.items() if t is x), name)
            self._seen[name] = x
            with torch.autocast(x.device.type, enabled=False):   # a bf16 forward's statistics stay fp32
                self.on_input(name, x)
        return hook

    def on_input(self, name: str, x: torch.Tensor) -> None:
        raise NotImplementedError


class InputStats(_InputHooks):
    """Accumulates ``Σ x xᵀ`` (fp32) of each watched linear's input over calibration batches.

    ``keep_inputs`` names linears whose raw inputs are also kept, per batch in order (spilled to
    disk past ``spill_budget``). ``stop_when_seen``: raise :class:`StopForward` as soon as every
    distinct input of the watched linears has been seen in a forward.
    """

    def __init__(self, modules: dict[str, nn.Module], *, keep_inputs=(), stop_when_seen: bool = True,
                 spill_budget: int = 32 << 20, spill_arena: SpillArena | None = None,
                 reference: InputRecorder | None = None):
        super().__init__(modules)
        self.reference = reference
        self.crosses: dict[str, torch.Tensor] = {}
        self.drift: dict[str, float] = {}          # Σ ‖x̃ − x‖² per owner
        self.keep = set(keep_inputs)
        self.stop_when_seen = stop_when_seen
        self.spill_budget = spill_budget
        self.sums: dict[str, torch.Tensor] = {}     # per owner: the linears sharing an input share it
        self.tokens: dict[str, int] = {}
        self.spill_arena = spill_arena
        self.kept: dict[str, SpilledTensors] = {n: SpilledTensors(spill_budget, spill_arena) for n in self.keep}
        self._batches = 0
        self._batch = -1

    def reset(self) -> None:
        """Forget everything collected (a stage that must be run again from its first batch)."""
        for kept in self.kept.values():
            kept.close()
        handles = self._handles       # the hooks stay registered: __exit__ must still remove them
        self.__init__(self.modules, keep_inputs=self.keep, stop_when_seen=self.stop_when_seen,
                      spill_budget=self.spill_budget, spill_arena=self.spill_arena, reference=self.reference)
        self._handles = handles

    def begin_batch(self) -> None:
        if self._seen:
            self._batches += 1
        self._batch += 1
        self._seen.clear()

    def _all_inputs_seen(self) -> bool:
        if self._batches == 0:   # sharing is only known once every linear has run once
            return len(self._seen) == len(self.modules)
        owners = {self.owner[n] for n in self.modules}
        return owners <= set(self._seen) and all(n in self._seen for n in self.keep)

    def on_input(self, name: str, x: torch.Tensor) -> None:
        if self.owner[name] == name:
            flat = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
            if name not in self.sums:
                self.sums[name] = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float32, device=flat.device)
                self.tokens[name] = 0
            with phase("hessian"):
                gram_update(self.sums[name], flat)
            self.tokens[name] += flat.shape[0]
            if self.reference is not None and name in self.reference.owner:
                with phase("hessian"):
                    self._cross_update(name, flat)
        if name in self.keep:
            with phase("keep inputs"):
                self.kept[name].append(x)
        if self.stop_when_seen and self._all_inputs_seen():
            raise StopForward

    def _cross_update(self, name: str, flat: torch.Tensor) -> None:
        """``ΔX·Xᵀ += (x̃ − x)ᵀ x``: this batch's full-precision-stream input minus its own."""
        ref = self.reference.inputs(name, self._batch).reshape(-1, flat.shape[1]).to(flat.device)
        if ref.shape != flat.shape:
            raise RuntimeError(f"{name}: the full-precision inputs of batch {self._batch} do not pair with its own")
        if name not in self.crosses:
            self.crosses[name] = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float32, device=flat.device)
            self.drift[name] = 0.0
        ref.sub_(flat)
        self.crosses[name].addmm_(ref.T, flat)
        add_flops(2.0 * flat.shape[0] * flat.shape[1] ** 2)
        self.drift[name] += float(ref.pow(2).sum())

    def all_reduce(self) -> None:
        """Sum the statistics over the ranks of a distributed run (each saw a slice of the samples);
        a no-op in one process."""
        from . import distributed

        if not distributed.active():
            return
        owners = sorted(self.sums)
        distributed.all_reduce_sum([self.sums[o] for o in owners] + [self.crosses[o] for o in sorted(self.crosses)])
        counts = distributed.all_reduce_numbers([float(self.tokens[o]) for o in owners])
        self.tokens = {o: int(c) for o, c in zip(owners, counts)}
        drift = sorted(self.drift)
        self.drift = dict(zip(drift, distributed.all_reduce_numbers([self.drift[o] for o in drift])))

    def cross_terms(self) -> dict[str, torch.Tensor]:
        """``D = 2/N Σ (x̃ − x) xᵀ`` per watched linear that has a full-precision reference."""
        out = {}
        for n in self.modules:
            o = self.owner.get(n)   # None: it never ran (an expert the router never picked)
            if o in self.crosses:
                out[n] = self.crosses[o] * (2.0 / max(self.tokens[o], 1))
        return out

    def input_drift(self) -> dict[str, float]:
        """``‖X̃ − X‖ / ‖X‖`` per watched linear: how far its inputs in the compressed model have
        moved from those of the full-precision model (the error that GPTAQ targets)."""
        out = {}
        for n in self.modules:
            o = self.owner.get(n)
            if o in self.drift:
                norm = float(torch.diagonal(self.sums[o]).sum())
                out[n] = (self.drift[o] / norm) ** 0.5 if norm > 0 else 0.0
        return out

    def tokens_of(self, name: str) -> int:
        """How many input rows linear ``name`` saw (an expert: the tokens routed to it)."""
        owner = self.owner.get(name)
        return self.tokens.get(owner, 0) if owner is not None else 0

    def hessians(self, missing_ok=()) -> dict[str, torch.Tensor]:
        """``H = 2/N Σ x xᵀ`` per watched linear (the reference scaling; damping is relative).
        A linear that never ran is an error unless named in ``missing_ok`` (an expert the router
        never picked): it is then left out."""
        # symmetrize in place leaves the upper triangle, so input_drift's diagonal stays valid
        full = {o: symmetrize(s) * (2.0 / max(self.tokens[o], 1)) for o, s in self.sums.items()}
        missing = [n for n in self.modules if n not in self.owner and n not in missing_ok]
        if missing:
            raise RuntimeError(f"no statistics were collected for {missing}: they never ran on calibration data")
        return {n: full[self.owner[n]] for n in self.modules if n in self.owner}


class InputRecorder(_InputHooks):
    """Keeps the inputs of some linears, batch by batch, once per distinct input tensor.

    It records the full-precision stream of a block for GPTAQ/ResComp: the original block runs
    on the full-precision hidden states and its linears' inputs ``X̃`` are kept here (spilled to
    disk past ``spill_budget``), to be paired token for token with the inputs ``X`` that the
    partially compressed block gives the same linears.
    """

    def __init__(self, modules: dict[str, nn.Module], *, spill_budget: int = 32 << 20,
                 spill_arena: SpillArena | None = None):
        super().__init__(modules)
        self.kept: dict[str, SpilledTensors] = {}
        self.spill_budget, self.spill_arena = spill_budget, spill_arena

    def begin_batch(self) -> None:
        self._seen.clear()

    def on_input(self, name: str, x: torch.Tensor) -> None:
        if self.owner[name] == name:
            if name not in self.kept:
                self.kept[name] = SpilledTensors(self.spill_budget, self.spill_arena)
            self.kept[name].append(x.to(torch.float32))

    def inputs(self, name: str, batch: int) -> torch.Tensor:
        """Batch ``batch`` of linear ``name``'s recorded input (a fresh tensor)."""
        kept = self.kept[self.owner[name]]
        t = kept[batch]
        return t.clone() if kept.file is None else t

    def close(self) -> None:
        for kept in self.kept.values():
            kept.close()
        self.kept.clear()
