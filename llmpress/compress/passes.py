"""The executor's forward passes over the calibration stream: the capture of every block's
arguments and block 0's inputs, a block run batch by batch (statistics, outputs), the original
block on the full-precision stream, and the precision they compute in (``forward_precision``);
and the pass over the unchanged model that the profiling and fitting stages make before it."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import nn

from ..devices import host_buffer, to_device
from ..layers.experts import experts_see_all_tokens, is_expert_linear
from .arch import ArchMap, blocks_of
from .memory import MemoryPlan, limit_heap_fragmentation
from .shortcuts import batch_ranges
from .stats import InputRecorder, InputStats, SpillArena, StopForward, disk_tensor


class BlockWeights(Protocol):
    """Where a pass over the blocks gets each block's weights (a streaming source keeps one block
    in memory)."""

    def after_capture(self) -> None:
        """The capture is done: the embeddings are no longer needed."""

    def materialize(self, block: nn.Module, prefix: str) -> None:
        """Load the block's original weights."""

    def release(self, block: nn.Module) -> None:
        """Free the block's tensors."""


class _Catcher(nn.Module):
    """Stands in for a decoder block during capture: records its call, passes hidden states on."""

    def __init__(self, index: int, last: bool, sink: list, hidden: list[torch.Tensor]):
        super().__init__()
        self.index, self.last, self.sink, self.hidden = index, last, sink, hidden

    def forward(self, hidden_states, *args, **kwargs):
        # Calibration runs with use_cache=False, so a cache argument (GPT-2 passes it by
        # position) is None and is kept as it is.
        kwargs.pop("past_key_values", None)
        self.sink[self.index].append((args, kwargs))
        if self.index == 0:
            self.hidden.append(hidden_states.detach().to(torch.float32))
        if self.last:
            raise StopForward
        return hidden_states


def stream_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, memory: MemoryPlan | None,
                  stream: int) -> torch.Tensor:
    """An activation stream where ``memory`` places it: the device's memory, RAM or a file."""
    if memory is not None and memory.placed(stream):
        return torch.empty(shape, dtype=dtype, device=device)
    if memory is not None and memory.on_disk[stream]:
        return disk_tensor(shape, dtype)
    return host_buffer(shape, dtype, device)


def forward_precision(device: torch.device, dtype: torch.dtype = torch.float32):
    """The context of the executor's forward passes through a block (statistics, outputs, the
    full-precision stream): as they are in fp32, or under autocast to ``dtype`` (bf16: the matmuls
    and the attention in bf16 with fp32 accumulation, norms, softmax and the residual stream in
    fp32; about twice the fp32 matmul rate on CPUs with AVX512-BF16 or AMX). The statistics hooks
    switch autocast off: Hessians accumulate in fp32, and solves never run under it."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, arch: ArchMap, windows: torch.Tensor, batch_size: int, memory: MemoryPlan | None = None,
    dtype: torch.dtype = torch.float32, device: torch.device = torch.device("cpu"),
) -> tuple[torch.Tensor, list[list[tuple[tuple, dict[str, Any]]]]]:
    """Block 0's inputs ``[n, seqlen, hidden]`` stored as ``dtype`` where ``memory`` places stream 0
    (default RAM) and every block's other arguments, per batch. The embeddings run where the model
    is (the CPU: only the current block goes to ``device``)."""
    blocks = blocks_of(model, arch)
    originals = list(blocks)
    sink: list[list[tuple[tuple, dict[str, Any]]]] = [[] for _ in originals]
    hidden: list[torch.Tensor] = []
    for i in range(len(originals)):
        blocks[i] = _Catcher(i, i == len(originals) - 1, sink, hidden)
    out = None
    try:
        for s, e in batch_ranges(windows.shape[0], batch_size):
            try:
                model(input_ids=windows[s:e], use_cache=False)
            except StopForward:
                pass
            batch = hidden.pop()
            if out is None:   # the width is known once the first batch has run
                shape = (windows.shape[0], *batch.shape[1:])
                out = stream_buffer(shape, dtype, device, memory, 0)
            out[s:e].copy_(batch)
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return out, sink


@torch.no_grad()
def run_block(
    block: nn.Module, hidden: torch.Tensor, kwargs: list[tuple[tuple, dict[str, Any]]], batch_size: int,
    *, stats: InputStats | None = None, write_outputs: bool = False, device: torch.device | None = None,
) -> None:
    """Run ``block`` over the stream ``hidden`` batch by batch, on ``device`` (default: the
    stream's); ``kwargs`` are already there."""
    device = device or hidden.device
    for b, (s, e) in enumerate(batch_ranges(hidden.shape[0], batch_size)):
        if stats is not None:
            stats.begin_batch()
        args, kw = kwargs[b]
        try:
            out = block(hidden[s:e].to(device, torch.float32), *args, **kw)
        except StopForward:
            continue
        if write_outputs:
            hidden[s:e].copy_(out[0] if isinstance(out, tuple) else out)


@torch.no_grad()
def record_fp_inputs(
    block: nn.Module, fp_hidden: torch.Tensor, kwargs, batch_size: int, linears: list[str],
    arena: SpillArena, write_outputs: bool, device: torch.device,
) -> InputRecorder | None:
    """Run the still-original block on the full-precision stream: keep the inputs of ``linears``
    (once per distinct input) and, with ``write_outputs``, advance the stream in place."""
    recorder = InputRecorder({n: block.get_submodule(n) for n in linears}, spill_arena=arena) if linears else None
    route_all = any(is_expert_linear(n) for n in linears)   # only reached with calibrate_all_experts
    with recorder if recorder is not None else contextlib.nullcontext(), experts_see_all_tokens(block, route_all):
        for b, (s, e) in enumerate(batch_ranges(fp_hidden.shape[0], batch_size)):
            if recorder is not None:
                recorder.begin_batch()
            args, kw = kwargs[b]
            out = block(fp_hidden[s:e].to(device, torch.float32), *args, **kw)
            if write_outputs:
                fp_hidden[s:e].copy_(out[0] if isinstance(out, tuple) else out)
    return recorder


def dense_block_pass(model: nn.Module, arch: ArchMap, windows: torch.Tensor, batch_size: int,
                     weights: BlockWeights | None = None, device: torch.device = torch.device("cpu"),
                     ) -> Iterator[tuple[int, nn.Module, Callable[..., None]]]:
    """The unchanged model, block by block on the full-precision stream: yields ``(index, block,
    run)``, where ``run(stats=None)`` runs the block over the stream and moves the stream on to the
    next block's input. ``weights`` streams the blocks' weights (each block is materialised before
    it is yielded and released after); without it ``model`` holds them all. The passes that must
    see every layer before any is compressed use it: an allocator's profile, HARP's statistics.
    The yielded block is on ``device`` (and back where it was afterwards); the stream stays in RAM."""
    limit_heap_fragmentation()
    blocks = blocks_of(model, arch)
    hidden, kwargs = capture_block_inputs(model, arch, windows, batch_size, device=device)
    if weights is not None:
        weights.after_capture()
    for i, block in enumerate(blocks):
        if weights is not None:
            weights.materialize(block, f"{arch.blocks}.{i}")
        block.to(device)
        yield i, block, functools.partial(run_block, block, hidden, to_device(kwargs[i], device), batch_size,
                                          write_outputs=i < len(blocks) - 1, device=device)
        block.to("cpu")
        if weights is not None:
            weights.release(block)
